"""DeepSeek-V4 (Flash / Pro): mHC, sliding + CSA + HCA attention, hash/top-k MoE, HC head.

Pure math: no file I/O, no printing. Weights arrive through a `get(name)` callable that returns the raw stored
tensor under its official checkpoint name (FP8 weights come with a sibling `<name>.scale`); routed experts go
through an `offload.base.ExpertBackend`. The inference state (`LayerState`) is explicit and functional: a forward
over a chunk returns the new states and never mutates the old ones, except for writes past the committed end of a
`RowStore`, so an interrupted chunk leaves the previous state intact.

Where the official reference (`inference/model.py`) and transformers (>= 5.10) differ, this follows transformers:
  * no FP8 activation / KV / FP4-indexer quantize-dequantize simulation, no Hadamard rotation in the indexer
    (HF dequantizes the weights and computes in the model dtype);
  * compressor projections and the router logits are computed in the compute dtype (official: fp32);
  * the shared expert uses the clamped SwiGLU (HF >= 5.10 and the current official revision);
  * routing weights are normalized as w / (sum + 1e-20) (HF TopKRouter / HashRouter).
Deliberate differences from transformers (none changes fp32 results beyond rounding):
  * attention scores, the sink softmax and the P.V product are computed in fp32 whatever the compute dtype
    (official kernel behaviour; HF uses the model dtype, so bf16 runs differ at bf16 rounding);
  * CSA attention gathers only the indexer's top-k entries per query instead of masking a dense
    [T, n_entries] score matrix, and the indexer's top-k is merged one KV page at a time (scores [q, Hi, page],
    never [q, n_entries]); query blocks bound the temporaries. Entry stores are paged (`homerun.models.kv`).
MTP (`mtp.*`) is not part of the forward: the loader may hold its tensors, this module never reads them.
"""

from homerun.models.deepseek_v4.config import (  # noqa: F401 - the architecture's names, as before the split
    LAYER_CSA, LAYER_HCA, LAYER_SLIDING, ModelArgs, YarnParams, _BLOCK_ELEMS)
from homerun.models.deepseek_v4.ops import (  # noqa: F401 - the architecture's names, as before the split
    apply_rope, inv_freq, norm_rope, rms_norm, rope_cos_sin)
from homerun.models.deepseek_v4.state import (  # noqa: F401 - the architecture's names, as before the split
    CompressorState, LayerState, RowStore)
from homerun.models.deepseek_v4.parts import (  # noqa: F401 - the architecture's names, as before the split
    _Attention, _Compressor, _HC, _Indexer, _Layer, _MoE)
from homerun.models.deepseek_v4.model import DeepseekV4  # noqa: F401 - the architecture's names, as before the split
from homerun.models.deepseek_v4.build import (  # noqa: F401 - the architecture's names, as before the split
    build_model)
