// Minimal ap_axi_sdata.h for C++ simulation without Vitis HLS (brevitas-a2q, finn_flow).
// finn-hlslib only uses qdma_axis<D, U, TI, TD> (data, keep, last and their accessors).
#ifndef A2Q_COMPAT_AP_AXI_SDATA_H
#define A2Q_COMPAT_AP_AXI_SDATA_H

#include <ap_int.h>

template <int D, int U, int TI, int TD>
struct qdma_axis {
  ap_uint<D> data;
  ap_uint<(D + 7) / 8> keep;
  ap_uint<1> last;

  ap_uint<D> get_data() const { return data; }
  void set_data(const ap_uint<D> &d) { data = d; }
  ap_uint<(D + 7) / 8> get_keep() const { return keep; }
  void set_keep(const ap_uint<(D + 7) / 8> &k) { keep = k; }
  ap_uint<1> get_last() const { return last; }
  void set_last(const ap_uint<1> &l) { last = l; }
};

#endif
