/* AVX-VNNI quantized matmul (256-bit vpdpbusd): see qgemm_x86_256.h. */
#pragma GCC target("avx2,fma,f16c,avxvnni")
#define SG_X86_VNNI 1
#include "qgemm_x86_256.h"

const sg_qgemm_fn sg_qgemm_avxvnni[SG_QTYPES] = SG_KERNEL_TABLE;
void sg_quantize_rows_avxvnni(const float *x, int64_t m, int64_t in, sg_qact *a) { quantize_rows(x, m, in, a); }
