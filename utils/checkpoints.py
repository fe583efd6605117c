"""Real MoE checkpoints in the course's own code: Hugging Face config.json + safetensors.

A published model directory holds config.json (the architecture) and the weights in one or more
*.safetensors files (with model.safetensors.index.json when sharded). This module
  1. builds a utils.modern.ModernMoEModel for config.json (model_from_hf_config; the config
     itself is translated by utils.hf_to_course.config_from_hf),
  2. names, for every tensor of the checkpoint, the slice of our model it fills (hf_tensor_map):
     the published files keep one matrix per expert (mlp.experts.{e}.gate_proj.weight), while
     our Experts stack them into one (E, H, D) tensor per weight,
  3. loads (load_hf_checkpoint) and writes (save_hf_checkpoint) such directories.

Loading builds the model on PyTorch's "meta" device (shapes, no storage), allocates it once,
then copies the checkpoint in one tensor at a time: the memory peak is the model plus one tensor,
never two copies of the weights. safetensors reads tensors straight from the file (no pickle,
so no code runs on load), which is why real checkpoints ship in it.

Supported families: utils.hf_to_course.SUPPORTED_MODEL_TYPES. Each is checked against
transformers' own implementation in tests/test_checkpoints.py.
"""
import json
import pathlib

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .dtypes import LOADABLE_DTYPES
from .hf_to_course import config_from_hf, refuse_quantized
from .modern import ModernMoEModel
from .experts import Experts
from .moe import MoEFeedForward

DTYPES = {name: getattr(torch, name) for name in LOADABLE_DTYPES}   # name -> torch dtype


def _dtype_name(dtype):
    """The name config.json gives a torch dtype (torch.bfloat16 -> "bfloat16"), as DTYPES names it."""
    return str(dtype).removeprefix("torch.")


def model_from_hf_config(hf, dtype=torch.float32, device="cpu"):
    """A randomly initialised ModernMoEModel for a config.json dict, which it keeps as
    `model.hf_config` (save_hf_checkpoint writes it back). device="meta" gives shapes only."""
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
    Raises FileNotFoundError for a missing directory or file, NotADirectoryError for a path to a
    file, and ValueError for an unsupported model_type, a quantised checkpoint (refused before any
    tensor is read), a tensor of the wrong shape, or tensors missing from or unknown to the model.
    """
    path = pathlib.Path(path)
    hf = read_hf_config(path)
    refuse_quantized(hf)                       # before any tensor is read (config_from_hf checks it too)
    files = _checkpoint_files(path)
    model = model_from_hf_config(hf, dtype=_dtype(dtype, hf), device="meta")
    model.to_empty(device=device)              # storage for every weight, once, uninitialised
    model.tie_weights()
    model.reset_buffers()
    expected = hf_tensor_map(model)
    seen = set()
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
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
                for part, piece in zip(parts, tensor.split([t.shape[dim] for t in parts], dim)):
                    part.copy_(piece)
                seen.add(name)
                del tensor, piece                          # before the next one is read
    missing = sorted(set(expected) - seen)
    if missing:
        raise ValueError(f"{len(missing)} tensor(s) missing from the checkpoint in {path}, e.g. {missing[:3]}")
    return model.eval()


@torch.no_grad()
def save_hf_checkpoint(model, path, max_shard_bytes=2 * 2**30):
    """Write the model as a Hugging Face directory that load_hf_checkpoint and transformers read.

    The model must come from model_from_hf_config or load_hf_checkpoint (it needs the
    `hf_config` to write). Weights are written in the published per-expert layout, in shards of at
    most max_shard_bytes (plus model.safetensors.index.json when there is more than one); only one
    shard's tensors are copied at a time. The directory must not hold a checkpoint already: old
    shards or an old index left next to the new files would be read instead of them.
    """
    hf = getattr(model, "hf_config", None)
    if hf is None:
        raise ValueError("the model has no hf_config: build it with model_from_hf_config or load_hf_checkpoint")
    path = pathlib.Path(path)
    if any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").exists():
        raise ValueError(f"{path} already holds a checkpoint: save into a new or empty directory")
    path.mkdir(parents=True, exist_ok=True)
    dtype = next(model.out_head.parameters()).dtype
    config = {**hf, "dtype": _dtype_name(dtype)}
    config.pop("torch_dtype", None)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    # Plan the shards from the tensors' sizes first, then copy and write one shard at a time.
    tensors = hf_tensor_map(model)
    shards, size = [[]], 0
    for name, (parts, _) in tensors.items():
        nbytes = sum(t.nbytes for t in parts)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    files = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for file, names in zip(files, shards):
        # cat or clone: each tensor gets its own storage (safetensors refuses views of one tensor)
        shard = {name: torch.cat(tensors[name][0], tensors[name][1]) if len(tensors[name][0]) > 1
                 else tensors[name][0][0].clone() for name in names}
        save_file(shard, path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
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
