"""polymodal's own compiled CPU kernels (`quantized_matmul`: int8/int4 matrix products on
AVX-512 VNNI or AVX2 for the quantized LLM's decode, and `decoder_step`: a whole decoding
step in one call). Each is compiled on first use for this CPU;
callers fall back to torch's kernels where one is unavailable."""
