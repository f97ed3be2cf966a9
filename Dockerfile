# brevitas-a2q with FINN: `a2q build` from estimates to bitstreams.
#   docker build -t brevitas-a2q .
#   docker run --rm -v $PWD:/work -w /work \
#     -v /tools/Xilinx:/tools/Xilinx -e FINN_XILINX_VERSION=2024.2 \
#     brevitas-a2q build model.onnx --board Pynq-Z1 --outputs bitfile --out build
# Xilinx tools are not in the image: mount the host installation at FINN_XILINX_PATH
# (default /tools/Xilinx, holding Vivado/<version> and Vitis/<version>) and name the version in
# FINN_XILINX_VERSION. Without them, estimates and C++ simulation (--verify cppsim) still work.
#
# This image uses upstream FINN dev at a pinned commit, with the finn-hlslib and cnpy commits its
# fetch-repos.sh pins (fetched here, at image build time): the FINN whose bitstream flow AMD
# maintains. pip users and CI get FINN+ from PyPI instead (see the Makefile); finn_flow runs on both
# (finn_flow/finn_compat.py).
FROM python:3.11-slim-bookworm

# Keep in step with finn_flow.environment.FINN_COMMIT (a test checks it).
ARG FINN_COMMIT=73ba5ed64e805cb765dda7e57694338d1917848f
# ap_int.h headers for C++ simulation without Vitis; the same pin as the Makefile
ARG HLS4ML_VERSION=1.3.0
ENV FINN_ROOT=/opt/finn \
    FINN_BUILD_DIR=/tmp/finn_build \
    FINN_XILINX_PATH=/tools/Xilinx \
    FINN_XILINX_VERSION=2024.2 \
    PIP_NO_CACHE_DIR=1

RUN apt-get update && apt-get install -y --no-install-recommends \
        git g++ make zlib1g-dev libgmp-dev libmpfr-dev unzip zip rsync \
    && rm -rf /var/lib/apt/lists/*

# The same steps as docs/finn.md ("Upstream FINN from a checkout"): FINN at the pinned commit and
# its dependency repositories from its own script (finn-hlslib and cnpy are what cppsim compiles).
RUN git clone https://github.com/Xilinx/finn.git $FINN_ROOT \
    && git -C $FINN_ROOT checkout $FINN_COMMIT \
    && cd $FINN_ROOT && bash fetch-repos.sh
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

# Our packages (pins qonnx 1.0.0, brevitas 0.13.4), then FINN itself without its requirements.txt
# (its pins, e.g. numpy 1.24 and onnx 1.17, conflict with ours), the modules FINN imports beyond
# ours, and the ap_int.h headers.
COPY pyproject.toml README.md /src/
COPY brevitas_a2q /src/brevitas_a2q
COPY finn_flow /src/finn_flow
RUN pip install /src \
    && pip install --no-deps -e $FINN_ROOT \
    && pip install clize dataclasses-json importlib-resources "bitstring>=4.3.1,<4.4" \
    && pip install --no-deps hls4ml==$HLS4ML_VERSION

ENTRYPOINT ["bash", "-c", "x=$FINN_XILINX_PATH; v=$FINN_XILINX_VERSION; \
if [ -f $x/Vivado/$v/settings64.sh ]; then . $x/Vivado/$v/settings64.sh; export VIVADO_PATH=$x/Vivado/$v; fi; \
if [ -f $x/Vitis/$v/settings64.sh ]; then . $x/Vitis/$v/settings64.sh; export VITIS_PATH=$x/Vitis/$v HLS_PATH=$x/Vitis_HLS/$v; fi; \
exec a2q \"$@\"", "a2q"]
CMD ["--help"]
