"""The course GPT with routed MoE layers, and what training such a model uses: sparse upcycling
from a trained dense GPT, auxiliary-loss-free bias updates, and a recorder of expert loads.

The layers themselves are in utils/moe.py; the GPT they go into is in utils/gpt.py.
"""
import torch

from .config import GPT_REQUIRED_KEYS, is_moe_block, validate_model_config
from .gpt import FeedForward, GPTModel
from .moe import MoEFeedForward, make_moe, moe_layers


class MoEGPTModel(GPTModel):
    """The GPT of utils/gpt.py with a routed MoE feed-forward (make_moe) in every
    moe_every_n_layers-th block and the dense FeedForward in the others. With num_experts = 0 it
    is the dense GPTModel. Token ids (B, T) -> logits (B, T, vocab_size)."""

    validate_config = staticmethod(validate_model_config)       # the GPT keys and the MoE keys

    def __init__(self, cfg):
        cfg = validate_model_config(cfg)
        super().__init__(cfg, feedforward=lambda layer: make_moe(cfg) if is_moe_block(cfg, layer) else FeedForward(cfg))


@torch.no_grad()
def upcycle(dense_model, cfg):
    """Sparse upcycling (Komatsuzaki et al. 2022, arXiv 2212.05055): an MoEGPTModel(cfg) that
    starts from a trained dense model instead of from random weights.

    Every weight outside the feed-forward layers (embeddings, attention, norms, output head) is
    copied. In every MoE layer, each of the E experts is a copy of that block's trained
    FeedForward, and the router is new, initialised from torch's current random state; dense
    blocks keep their FeedForward. cfg must be the dense model's config plus the MoE keys, with
    "gelu" experts whose moe_hidden_dim is the dense FeedForward's hidden size.

    With renormalised top-k gates (norm_topk_prob, the default; they sum to 1) and
    routed_scaling_factor 1, every token's output is sum_e gate_e * FFN(x) = FFN(x): the new model
    computes exactly the dense model's function until training moves its experts apart.
    """
    if not isinstance(dense_model, GPTModel) or moe_layers(dense_model):
        raise ValueError("dense_model must be a dense GPTModel (a model without MoE layers)")
    cfg = validate_model_config(cfg)
    hidden = dense_model.cfg["ffn_hidden_dim"]
    if cfg["num_experts"] < 1:
        raise ValueError(f"num_experts must be at least 1 to upcycle, got {cfg['num_experts']}")
    for key in (*GPT_REQUIRED_KEYS, "qkv_bias"):
        if cfg[key] != dense_model.cfg[key]:
            raise ValueError(f"cfg must describe the dense model's GPT: {key} is {cfg[key]!r} in cfg, "
                             f"{dense_model.cfg[key]!r} in the dense model")
    for key, allowed in (("expert_type", "gelu"), ("moe_hidden_dim", hidden), ("latent_dim", None),
                         ("num_shared_experts", 0)):
        if cfg[key] != allowed:
            raise ValueError(f"upcycling copies the dense FeedForward (GELU, hidden {hidden}) into every "
                             f"expert, so {key} must be {allowed!r}, got {cfg[key]!r}")
    for key, allowed in (("norm_topk_prob", True), ("routed_scaling_factor", 1.0), ("capacity_factor", None)):
        if cfg[key] != allowed:   # otherwise the gates would not sum to 1, or assignments would be dropped
            raise ValueError(f"an upcycled model starts as the dense function only with {key} = {allowed!r}, "
                             f"got {cfg[key]!r}")
    model = MoEGPTModel(cfg)
    dense_state = dense_model.state_dict()
    # The MoE layers' tensors are filled below; every other tensor is the dense model's.
    routed = {id(t) for layer in moe_layers(model) for t in (*layer.parameters(), *layer.buffers())}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in routed:
            continue
        if name not in dense_state or dense_state[name].shape != tensor.shape:
            found = tuple(dense_state[name].shape) if name in dense_state else "nothing"
            raise ValueError(f"cfg does not match the dense model at {name}: expected shape "
                             f"{tuple(tensor.shape)}, the dense model has {found}")
        tensor.copy_(dense_state[name])
    for block, dense_block in zip(model.trf_blocks, dense_model.trf_blocks):
        if isinstance(block.ff, MoEFeedForward):
            fc1, fc2 = dense_block.ff.layers[0], dense_block.ff.layers[2]
            experts = block.ff.experts
            experts.w_in.copy_(fc1.weight.expand_as(experts.w_in))       # (E, H, D) <- (H, D)
            experts.b_in.copy_(fc1.bias.expand_as(experts.b_in))
            experts.w_out.copy_(fc2.weight.expand_as(experts.w_out))     # (E, D, H) <- (D, H)
            experts.b_out.copy_(fc2.bias.expand_as(experts.b_out))
    reference = next(dense_model.parameters())
    return model.to(reference.device, reference.dtype)         # the router stays float32 (TopKRouter._apply)


@torch.no_grad()
def update_expert_biases(model, step=None):
    """Auxiliary-loss-free balancing (DeepSeek-V3), as an `after_step` callback for train().

    For every MoE layer with bias_update_rate > 0: expert_bias += rate * sign(mean load - load),
    with the load counted from the layer's last batch. Overloaded experts become less likely to
    be selected, underloaded ones more; no gradient and no loss term are involved.
    """
    for layer in moe_layers(model):
        if layer.bias_update_rate > 0:
            load = torch.bincount(layer.last_routing["topk_idx"].reshape(-1), minlength=layer.num_experts).float()
            bias = layer.router.expert_bias
            bias += layer.bias_update_rate * torch.sign(load.mean() - load).to(bias.device)


class LoadRecorder:
    """An `after_step` callback for utils.train.train that keeps every step's expert load.

    After training, `loads()` is a (steps, layers, E) tensor of assignment counts.
    """

    def __init__(self):
        self.history = []

    def __call__(self, model, step):
        self.history.append(torch.stack([m.last_routing["tokens_per_expert"].cpu() for m in moe_layers(model)]))

    def loads(self):
        return torch.stack(self.history)
