// zlib.h pass-through that also declares `half` (brevitas-a2q, finn_flow).
// FINN's fork of cnpy names `half` in cnpy.cpp (typeid(half)) without including a header for it:
// with Vitis HLS the type comes from the tool's include directory. cnpy.h includes <zlib.h>
// before anything else that could provide it, and this directory is the tool include directory
// in cppsim builds, so the system header is included unchanged and `half` is added here.
#ifndef A2Q_COMPAT_ZLIB_H
#define A2Q_COMPAT_ZLIB_H
#include_next <zlib.h>
#ifdef __cplusplus
#include "hls_half.h"
#endif
#endif
