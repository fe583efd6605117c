"""What every parameter count shares: the components it reports, the formula of one MLP, and the
summary dict that utils/params.py (course configs and models) and utils/hf_params.py (Hugging Face
configs) both return."""
from .config import EXPERT_TYPES

# The parts a model's parameters are reported in ("recurrent": the Mamba-2 and Gated DeltaNet mixers
# of hybrid models; "latent_proj": a LatentMoE's down and up projections).
COMPONENTS = ("embedding", "attention", "recurrent", "dense_ffn", "routed_experts", "shared_experts",
              "router", "latent_proj", "norms", "lm_head")


def mlp_parameters(kind, dim, hidden, biases=False):
    """Parameters of one MLP on vectors of size `dim` with `hidden` units.

    kind: "gelu" or "relu2" (an up and a down projection: 2 * dim * hidden weights) or "swiglu"
    (gate, up and down projections: 3 * dim * hidden). biases: whether each projection has one
    (hidden values for each projection into the hidden layer, dim for the one back).
    """
    if kind not in EXPERT_TYPES:
        raise ValueError(f"expert_type must be one of {EXPERT_TYPES}, got {kind!r}")
    into_hidden = 2 if kind == "swiglu" else 1          # projections dim -> hidden
    weights = (into_hidden + 1) * dim * hidden
    return weights + (into_hidden * hidden + dim if biases else 0)


def parameter_summary(components, active_components):
    """{"total", "active", "components", "active_components"} from two {component: parameters}
    dicts (everything stored, what one token uses); components with no parameters are left out."""
    components = {k: v for k, v in components.items() if v}
    active_components = {k: v for k, v in active_components.items() if v}
    return {"total": sum(components.values()), "active": sum(active_components.values()),
            "components": components, "active_components": active_components}
