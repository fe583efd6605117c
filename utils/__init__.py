"""The code the notebooks build, one module per idea. Each module imports only modules above it:

config            the keys a model config may have, their defaults and checks
tokenizer, data   GPT-2's BPE offline; the two-domain corpus and its next-token windows
gpt               the dense GPT: attention, LayerNorm, GELU MLP, blocks, model
generation        the KV cache and generate (greedy or sampled, cached or not)
router            the MoE router (top-k, sigmoid, groups) and the balancing losses
experts           the experts, and the dispatch of tokens to them
moe               the MoE layer: capacity, shared experts, latent MoE
moe_gpt           the GPT with MoE layers, sparse upcycling, training callbacks
modern            the modern decoder of real MoE models (RMSNorm, RoPE, grouped-query attention)
train             the training loop (AdamW, warmup + cosine, clipping, validation, hooks)
runs              one training run of notebooks 05-07 from its seed, statistics over seeds
experiments       the runs notebooks 05-07 train, and the seed sweeps behind their claims
pretrained        05's MoE and dense twin trained 33x longer, shipped as safetensors (load_pretrained)
routing_analysis, benchmark, plotting   which experts tokens choose; timing; figures
quant             FP8 (block-scaled) and MXFP4 weights: quantise, dequantise, error bounds
dtypes, counting, hf_config, hf_moe, hf_params, params, published, memory
                  parameters and bytes of our models and of real ones (from their config.json)
serving           what a decode step reads: experts touched, weight bytes
launch, parallel, parallel_runs   processes with torch.distributed; expert parallelism;
                  what notebook 10 runs on every process
hf_to_course, checkpoints   real Hugging Face checkpoints in the course's decoder (FP8 ones too)
course            the notebooks' setup cell
"""
