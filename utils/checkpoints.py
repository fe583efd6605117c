"""Real MoE checkpoints in the course's own code: Hugging Face config.json + safetensors.

A published model directory holds config.json (the architecture) and the weights in one or more
*.safetensors files (with model.safetensors.index.json when sharded). This module
  1. builds a utils.modern.ModernMoEModel for config.json (model_from_hf_config; the config
     itself is translated by utils.hf_to_course.config_from_hf),
  2. names, for every tensor of the checkpoint, the slice of our model it fills (hf_tensor_map):
     the published files keep one matrix per expert (mlp.experts.{e}.gate_proj.weight), while
     our Experts stack them into one (E, H, D) tensor per weight,
  3. loads (load_hf_checkpoint) and writes (save_hf_checkpoint) such directories, unquantised or
     in block-scaled FP8 (DeepSeek-V3's and Qwen3-*-FP8's layout, utils/quant.py).

Loading builds the model on PyTorch's "meta" device (shapes, no storage), allocates it once,
then copies the checkpoint in one tensor at a time: the memory peak is the model plus one tensor,
never two copies of the weights. safetensors reads tensors straight from the file (no pickle,
so no code runs on load), which is why real checkpoints ship in it.

FP8 checkpoints are dequantised when they are loaded, into the requested dtype; the model then
holds float weights (2 bytes each in bfloat16) and computes like any other. Why not keep the experts
in FP8 and dequantise each one when a token needs it? That saves memory (1 byte per weight) but
costs a dequantisation per expert and step, and the course's experts, like CPUs, multiply float
matrices: FP8 matmuls need GPU kernels (which also quantise the activations). Loading dequantised,
every tool of the course (generate, the routing analysis, save_hf_checkpoint) runs on the model
unchanged. Notebook 12 builds the other way, experts kept quantised in slow memory and dequantised
into a cache of fast memory, where it pays: when the model does not fit.

Supported families: utils.hf_to_course.SUPPORTED_MODEL_TYPES. Each is checked against
transformers' own implementation in tests/test_checkpoints.py.
"""
import json
import pathlib

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .dtypes import LOADABLE_DTYPES
from .hf_to_course import FP8_QUANTIZATION, config_from_hf
from .hf_to_course import fp8_block_size as fp8_block_size_of
from .modern import ModernMoEModel
from .experts import Experts
from .moe import MoEFeedForward
from .quant import FP8_DTYPE, check_block, dequantize_fp8_blockwise, quantize_fp8_blockwise, quantized_bytes

DTYPES = {name: getattr(torch, name) for name in LOADABLE_DTYPES}   # name -> torch dtype


def _dtype_name(dtype):
    """The name config.json gives a torch dtype (torch.bfloat16 -> "bfloat16"), as DTYPES names it."""
    return str(dtype).removeprefix("torch.")


def model_from_hf_config(hf, dtype=torch.float32, device="cpu"):
    """A randomly initialised ModernMoEModel for a config.json dict, which it keeps as
    `model.hf_config` (save_hf_checkpoint writes it back). device="meta" gives shapes only.
    A config of an FP8 checkpoint builds the same model, in float (load_hf_checkpoint dequantises)."""
    cfg = config_from_hf(hf)
    with torch.device(device):                 # built there directly: "meta" allocates nothing
        model = ModernMoEModel(cfg)
    model = model.to(dtype)
    model.hf_config = dict(hf)
    return model


# Per family: where the feed-forward of block i lives in the checkpoint, and the names of its
# expert weights, as (name in the checkpoint, our stacked weight). Ours: w_gate (the SiLU branch),
# w_in (the linear branch), w_out (back to emb_dim).
_MLP_NAMES = (("gate_proj", "w_gate"), ("up_proj", "w_in"), ("down_proj", "w_out"))
_MIXTRAL_NAMES = (("w1", "w_gate"), ("w3", "w_in"), ("w2", "w_out"))
_ATTENTION_NAMES = (("q_proj", "W_query"), ("k_proj", "W_key"), ("v_proj", "W_value"), ("o_proj", "out_proj"))


def hf_tensor_map(model):
    """Every tensor of the model's checkpoint: {name in the checkpoint: (parts, dim)}.

    `parts` are the views of our parameters the tensor fills: usually one (a whole parameter, or
    expert e's slice of a stacked expert weight). Granite stores each expert's SiLU and linear
    branches as one (E, 2F, D) matrix (F: an expert's hidden width): two parts, concatenated
    along `dim`.
    """
    model_type = model.hf_config["model_type"]
    moe_module = "block_sparse_moe" if model_type in ("mixtral", "granitemoe") else "mlp"
    p = lambda t: t.detach()  # noqa: E731  (views of the parameters' storage, written in place)
    tensors = {"model.embed_tokens.weight": ([p(model.tok_emb.weight)], 0),
               "model.norm.weight": ([p(model.final_norm.weight)], 0)}
    for i, block in enumerate(model.trf_blocks):
        pre = f"model.layers.{i}."
        tensors[pre + "input_layernorm.weight"] = ([p(block.norm1.weight)], 0)
        tensors[pre + "post_attention_layernorm.weight"] = ([p(block.norm2.weight)], 0)
        for hf_name, ours in _ATTENTION_NAMES:
            linear = getattr(block.att, ours)
            tensors[f"{pre}self_attn.{hf_name}.weight"] = ([p(linear.weight)], 0)
            if linear.bias is not None:
                tensors[f"{pre}self_attn.{hf_name}.bias"] = ([p(linear.bias)], 0)
        if block.att.q_norm is not None:
            tensors[pre + "self_attn.q_norm.weight"] = ([p(block.att.q_norm.weight)], 0)
            tensors[pre + "self_attn.k_norm.weight"] = ([p(block.att.k_norm.weight)], 0)
        ff = block.ff
        if isinstance(ff, Experts):                                   # a dense SwiGLU MLP
            for hf_name, ours in _MLP_NAMES:
                tensors[f"{pre}mlp.{hf_name}.weight"] = ([p(getattr(ff, ours)[0])], 0)
            continue
        assert isinstance(ff, MoEFeedForward)
        moe = pre + moe_module + "."
        experts = ff.experts
        if model_type == "granitemoe":
            tensors[moe + "router.layer.weight"] = ([p(ff.router.gate.weight)], 0)
            tensors[moe + "input_linear.weight"] = ([p(experts.w_gate), p(experts.w_in)], 1)   # (E, 2F, D)
            tensors[moe + "output_linear.weight"] = ([p(experts.w_out)], 0)                  # (E, D, F)
            continue
        tensors[moe + "gate.weight"] = ([p(ff.router.gate.weight)], 0)
        names = _MIXTRAL_NAMES if model_type == "mixtral" else _MLP_NAMES
        for e in range(experts.num_experts):
            for hf_name, ours in names:
                tensors[f"{moe}experts.{e}.{hf_name}.weight"] = ([p(getattr(experts, ours)[e])], 0)
        if ff.shared_expert is not None:                              # Qwen2-MoE
            for hf_name, ours in _MLP_NAMES:
                tensors[f"{moe}shared_expert.{hf_name}.weight"] = ([p(getattr(ff.shared_expert, ours)[0])], 0)
            tensors[moe + "shared_expert_gate.weight"] = ([p(ff.shared_expert_gate.weight)], 0)
    if not model.cfg["tie_embeddings"]:
        tensors["lm_head.weight"] = ([p(model.out_head.weight)], 0)
    return tensors


def _expected_shape(parts, dim):
    shape = list(parts[0].shape)
    shape[dim] = sum(t.shape[dim] for t in parts)
    return tuple(shape)


# The linear layers an FP8 checkpoint stores in FP8 (DeepSeek-V3, Qwen3-*-FP8): attention
# projections and the experts' (also shared experts' and dense MLPs') matrices. Embeddings, norms,
# routers, shared-expert gates and the output head stay in their float dtype.
_FP8_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3",
                "input_linear", "output_linear")


# How far a model loaded from a block-scaled FP8 checkpoint may move the logits: the relative change
# |logits_fp8 - logits| / |logits| (L2 norms over all positions) against the unquantised model. A
# measured tolerance with a margin, not a derived bound (the weights have one, utils.quant.fp8_error_bound;
# how a network amplifies it does not): the random checkpoints of tests/test_checkpoints.py (variant
# "a" of qwen3_moe, olmoe, mixtral and qwen2_moe, seeds 0-2, blocks of 8, 32 and 128) moved by at
# most 0.16. Random weights at a realistic scale amplify small changes (one token routed to another
# expert moves its logits whatever the cause), so deeper random models can move more (their variant
# "b", one expert per token in OLMoE's: up to 0.46); notebook 12's small random Qwen3-MoE moves by
# about 0.01. Checked in tests/test_checkpoints.py and notebook 12.
FP8_LOGIT_RTOL = 0.25


def is_fp8_linear(name):
    """Whether save_hf_checkpoint stores the checkpoint tensor `name` in FP8 (with a <name>_scale_inv)."""
    return name.endswith(".weight") and name.rsplit(".", 2)[-2] in _FP8_LINEARS


def _checkpoint_files(path):
    """The safetensors files of a model directory: those the index names, or all there are."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(f.name for f in path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors file in {path} (PyTorch .bin checkpoints are not "
                                    "supported: they are pickles, which can run code when loaded)")
    for name in files:
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} is named in model.safetensors.index.json but missing")
    return [path / name for name in files]


def read_hf_config(path):
    """The config.json of a model directory, as a dict."""
    path = pathlib.Path(path)
    if path.is_file():
        hint = ""
        if path.name in ("config.json", "model.safetensors.index.json") or path.suffix == ".safetensors":
            hint = f"; this file is part of one: pass its folder, {path.parent}"
        raise NotADirectoryError(f"{path} is a file: the loader needs the model's directory, the one that holds "
                                 f"config.json and the *.safetensors files{hint}")
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config} is missing: a Hugging Face model directory has a config.json")
    return json.loads(config.read_text())


def _dtype(dtype, hf):
    """The dtype to load in: `dtype` (a torch dtype or its name), else the checkpoint's own."""
    if dtype is None:
        dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype, dtype)
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    return dtype


@torch.no_grad()
def load_hf_checkpoint(path, dtype=None, device="cpu"):
    """Load a local Hugging Face model directory into a ModernMoEModel, in eval mode.

    path: a directory with config.json and *.safetensors (sharded with an index, or not).
    dtype: torch.float32 / bfloat16 / float16 (or their names); None keeps the checkpoint's.
    The routers stay in float32 whatever the dtype (see utils.router.TopKRouter).
    Block-scaled FP8 checkpoints (quantization_config quant_method "fp8", see
    utils.hf_to_course.fp8_block_size) are read too: every float8_e4m3fn weight is dequantised with
    its <name>_scale_inv (utils.quant.dequantize_fp8_blockwise, in float32, rounded once to dtype)
    as it is copied in; tensors stored in float are read as they are.
    Raises FileNotFoundError for a missing directory or file, NotADirectoryError for a path to a
    file, and ValueError for an unsupported model_type, a quantisation other than block-scaled FP8
    (refused before any tensor is read), a tensor of the wrong shape, an FP8 tensor without its scale
    (or a scale without its FP8 tensor), or tensors missing from or unknown to the model.
    """
    path = pathlib.Path(path)
    hf = read_hf_config(path)
    block = fp8_block_size_of(hf)              # before any tensor is read (config_from_hf checks it too)
    files = _checkpoint_files(path)
    model = model_from_hf_config(hf, dtype=_dtype(dtype, hf), device="meta")
    model.to_empty(device=device)              # storage for every weight, once, uninitialised
    model.tie_weights()
    model.reset_buffers()
    expected = hf_tensor_map(model)
    file_of = {}                               # every tensor's file (a scale may sit in another shard)
    for file in files:
        with safe_open(file, framework="pt") as f:
            file_of.update(dict.fromkeys(f.keys(), file))
    seen = set()
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if name.endswith("_scale_inv"):
                    if name.removesuffix("_scale_inv") not in file_of:
                        raise ValueError(f"{file.name}: {name!r} scales a tensor the checkpoint does not have")
                    continue                               # read with its FP8 weight
                if name not in expected:
                    if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and model.cfg["tie_embeddings"]):
                        continue                           # recomputed, or the tied embedding again
                    raise ValueError(f"{file.name}: tensor {name!r} does not belong to a {hf['model_type']} "
                                     "model of this config")
                parts, dim = expected[name]
                tensor = f.get_tensor(name)
                if tuple(tensor.shape) != _expected_shape(parts, dim):
                    raise ValueError(f"{file.name}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                     f"the config asks for {_expected_shape(parts, dim)}")
                if tensor.dtype == FP8_DTYPE or name + "_scale_inv" in file_of:
                    tensor = _dequantized(tensor, name, file_of, block)
                for part, piece in zip(parts, tensor.split([t.shape[dim] for t in parts], dim)):
                    part.copy_(piece)
                seen.add(name)
                del tensor, piece                          # before the next one is read
    missing = sorted(set(expected) - seen)
    if missing:
        raise ValueError(f"{len(missing)} tensor(s) missing from the checkpoint in {path}, e.g. {missing[:3]}")
    return model.eval()


def _dequantized(tensor, name, file_of, block):
    """The float32 weights of the FP8 checkpoint tensor `name`, read with its <name>_scale_inv."""
    scale_name = name + "_scale_inv"
    if block is None:
        raise ValueError(f"tensor {name!r} is stored in {tensor.dtype} but config.json declares no FP8 "
                         "quantization_config (with its weight_block_size)")
    if tensor.dtype != FP8_DTYPE:
        raise ValueError(f"tensor {name!r} has a {scale_name!r} but is stored in {tensor.dtype}, not {FP8_DTYPE}")
    if scale_name not in file_of:
        raise ValueError(f"FP8 tensor {name!r} has no {scale_name!r} in the checkpoint")
    with safe_open(file_of[scale_name], framework="pt") as f:
        scale_inv = f.get_tensor(scale_name)
    try:
        return dequantize_fp8_blockwise(tensor, scale_inv, block)
    except ValueError as err:
        raise ValueError(f"{scale_name!r}: {err}") from None


@torch.no_grad()
def save_hf_checkpoint(model, path, max_shard_bytes=2 * 2**30, fp8_block_size=None):
    """Write the model as a Hugging Face directory that load_hf_checkpoint and transformers read.

    The model must come from model_from_hf_config or load_hf_checkpoint (it needs the
    `hf_config` to write). Weights are written in the published per-expert layout, in shards of at
    most max_shard_bytes (plus model.safetensors.index.json when there is more than one); only one
    shard's tensors are copied at a time. The directory must not hold a checkpoint already: old
    shards or an old index left next to the new files would be read instead of them.

    fp8_block_size: None writes every tensor in the model's dtype (and no quantization_config);
    (rows, cols), e.g. (128, 128), writes a block-scaled FP8 checkpoint as DeepSeek-V3 and
    Qwen3-*-FP8 ship them: every attention and expert matrix (is_fp8_linear) in float8_e4m3fn beside
    its float32 <name>_scale_inv (utils.quant.quantize_fp8_blockwise), the rest in the model's
    dtype, and config.json's quantization_config saying so.
    """
    hf = getattr(model, "hf_config", None)
    if hf is None:
        raise ValueError("the model has no hf_config: build it with model_from_hf_config or load_hf_checkpoint")
    path = pathlib.Path(path)
    if any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").exists():
        raise ValueError(f"{path} already holds a checkpoint: save into a new or empty directory")
    fp8_block_size = check_block(fp8_block_size, name="fp8_block_size", allow_none=True)
    path.mkdir(parents=True, exist_ok=True)
    dtype = next(model.out_head.parameters()).dtype
    config = {key: value for key, value in hf.items() if key not in ("torch_dtype", "quantization_config")}
    config["dtype"] = _dtype_name(dtype)
    if fp8_block_size is not None:
        config["quantization_config"] = {**FP8_QUANTIZATION, "weight_block_size": list(fp8_block_size)}
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    # Plan the shards from the tensors' sizes first, then copy and write one shard at a time.
    tensors = hf_tensor_map(model)
    quantized = {name for name in tensors if fp8_block_size is not None and is_fp8_linear(name)}
    shards, size = [[]], 0
    for name, (parts, dim) in tensors.items():
        nbytes = quantized_bytes(_expected_shape(parts, dim), "fp8", fp8_block_size) if name in quantized \
            else sum(t.nbytes for t in parts)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    files = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for file, names in zip(files, shards):
        shard = {}
        for name in names:
            # cat or clone: each tensor gets its own storage (safetensors refuses views of one tensor)
            parts, dim = tensors[name]
            tensor = torch.cat(parts, dim) if len(parts) > 1 else parts[0].clone()
            if name in quantized:
                shard[name], shard[name + "_scale_inv"] = quantize_fp8_blockwise(tensor, fp8_block_size)
            else:
                shard[name] = tensor
        save_file(shard, path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        total += sum(t.nbytes for t in shard.values())
        del shard
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return path


def load_tokenizer(path):
    """The tokenizer of a Hugging Face model directory (its tokenizer.json), read with the
    `tokenizers` library (installed with transformers, and on Colab). Returns an object with
    encode(text) -> list of ids and decode(ids) -> text."""
    file = pathlib.Path(path) / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing")
    from tokenizers import Tokenizer

    return _Tokenizer(Tokenizer.from_file(str(file)))


class _Tokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tokenizer.decode(list(ids))


def download_hf_checkpoint(repo_id, local_dir):
    """Download a model's config, safetensors and tokenizer from the Hugging Face Hub into
    local_dir (needs network and the huggingface_hub package, imported only here)."""
    from huggingface_hub import snapshot_download

    return pathlib.Path(snapshot_download(repo_id, local_dir=local_dir,
                                          allow_patterns=["*.json", "*.safetensors"]))
