/* AVX-VNNI quantized matmul (256-bit vpdpbusd): see qgemm_x86_256.h. */
#pragma GCC target("avx2,fma,f16c,avxvnni")
#define SG_X86_VNNI 1
#include "qgemm_x86_256.h"

const sg_qgemm_fn sg_qgemm_avxvnni[SG_QTYPES] = SG_KERNEL_TABLE;
