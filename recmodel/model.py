"""The recommender: a causal transformer (Hugging Face GPT-2 blocks) over a user's recent items.

An item's vector fuses a learned id embedding with a projection of its MiniLM text embedding:

    item_vector[i] = id_embedding[i] + W_text @ text_embedding[i]

Id embeddings start at zero, so an item nobody has interacted with yet (or that joined the
catalog after the last training run) is represented by its text alone and can still be
recommended; interactions then learn a residual on top. An item no training sequence leads to is
not a class of the loss, so nothing pushes it down. After training, items with few positives
borrow the id embedding of their text neighbours (`fill_cold_ids`) where the text informs. Scores are dot products between the
transformer's hidden state at the last history position and every item vector, trained on the
next item with softmax cross-entropy: exact over the catalog, or sampled for large catalogs
(`recmodel.train`). With `item_text=False` (an ablation) an item is its id embedding alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import AttentionInterface, GPT2Config, GPT2Model
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from recmodel.data import PAD, TEXT_DIM


@dataclass(frozen=True)
class ModelConfig:
    n_items: int  # vocabulary size including the padding index 0
    max_history: int = 50
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    dropout: float = 0.2
    text_dim: int = TEXT_DIM
    item_text: bool = True  # False: id embeddings only, as in a plain SASRec
    # With text: the largest norm an item's id embedding (its delta from its text) may take, 0 = unbounded.
    delta_max_norm: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def byte_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout whose CPU mask comes from random bytes: 8 per draw of the generator, not one.

    On CPU, drawing one Bernoulli sample per activation took a fifth of a training step; here
    the drop rate is rounded to 1/256 (0.2 drops 51/256 = 19.9%) and the scale matches the
    rounded rate, so activations keep their expected value. On CUDA it is PyTorch's dropout.
    """
    dropped_bytes = min(round(p * 256), 255)
    if dropped_bytes == 0 or x.is_cuda:
        return nn.functional.dropout(x, p, training=True)
    draws = torch.randint(-2**63, 2**63 - 1, ((x.numel() + 7) // 8,), dtype=torch.int64, device=x.device)
    kept = draws.view(torch.uint8)[:x.numel()].view(x.shape) >= dropped_bytes
    return x * kept.to(x.dtype) * (256 / (256 - dropped_bytes))


class ByteDropout(nn.Dropout):
    """nn.Dropout drawn as `byte_dropout` draws it; what GPT-2's dropout modules are replaced with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return byte_dropout(x, self.p) if self.training else x


def _byte_dropout_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                            **_: object) -> tuple[torch.Tensor, torch.Tensor]:
    """GPT-2's eager attention, with the attention-weight dropout drawn as ByteDropout draws it.

    SDPA drops attention weights with one Bernoulli draw per (batch, head, query, key): on a
    CPU at 200-item windows that was the largest single cost of a training step.
    """
    weights = torch.matmul(query, key.transpose(-1, -2)) * (query.size(-1) ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = nn.functional.softmax(weights, dim=-1).type(value.dtype)
    if module.training:
        weights = byte_dropout(weights, dropout)
    return torch.matmul(weights, value).transpose(1, 2), weights


CPU_TRAINING_ATTENTION = "recsys_byte_dropout"
AttentionInterface.register(CPU_TRAINING_ATTENTION, _byte_dropout_attention)
AttentionMaskInterface.register(CPU_TRAINING_ATTENTION, eager_mask)


def bounded(rows: torch.Tensor, max_norm: float) -> torch.Tensor:
    """`rows` scaled down where their L2 norm exceeds `max_norm` (0: unchanged); differentiable.

    Bounding each item's id embedding (its delta from the projected text) keeps every item close to
    where its text puts it ("Let It Go? Not Quite", arXiv 2507.19473): ids can refine the text but
    not replace it, so text-only vectors of new items live in the space warm items are ranked in.
    """
    if max_norm <= 0:
        return rows
    norms = rows.norm(dim=1, keepdim=True)
    return rows * (max_norm / norms.clamp(min=max_norm))


class SequentialRecommender(nn.Module):
    def __init__(self, config: ModelConfig, text_matrix: torch.Tensor) -> None:
        super().__init__()
        self.config = config
        self.id_embedding = nn.Embedding(config.n_items, config.d_model, padding_idx=PAD)
        if config.item_text:
            nn.init.zeros_(self.id_embedding.weight)  # an item starts as its text
        else:
            nn.init.normal_(self.id_embedding.weight, std=0.02)  # GPT-2's own initialisation
            self.id_embedding.weight.data[PAD] = 0.0
        self.text_projection = nn.Linear(config.text_dim, config.d_model, bias=False)
        # Frozen MiniLM embeddings in vocabulary order, (n_items, text_dim); saved with the weights.
        self.register_buffer("text_matrix", text_matrix.float())
        self.encoder = GPT2Model(GPT2Config(
            vocab_size=1,  # tokens come in as inputs_embeds; GPT-2's own token table is unused
            n_positions=config.max_history,
            n_embd=config.d_model,
            n_layer=config.n_layers,
            n_head=config.n_heads,
            resid_pdrop=config.dropout,
            embd_pdrop=config.dropout,
            attn_pdrop=config.dropout,
            bos_token_id=None,
            eos_token_id=None,
            # GPT-2's tanh-approximated GELU as one fused kernel; "gelu_new" computes the same
            # formula in six elementwise ops, which cost 5-10% of a CPU training step.
            activation_function="gelu_pytorch_tanh",
        ))
        for parent in self.encoder.modules():
            for name, child in parent.named_children():
                if isinstance(child, nn.Dropout):
                    setattr(parent, name, ByteDropout(child.p))

    def item_vectors(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(n_items, d_model) representation of every item, or (len(rows), d_model) of `rows` only
        (what a sampled loss needs); the padding item's vector is zero."""
        if rows is None:
            ids, text = self.id_embedding.weight, self.text_matrix
            rows = torch.arange(len(ids), device=ids.device)
        else:
            ids, text = self.id_embedding(rows), self.text_matrix[rows]
        if not self.config.item_text:
            return ids.masked_fill((rows == PAD).unsqueeze(1), 0.0)
        vectors = bounded(ids, self.config.delta_max_norm) + self.text_projection(text)
        return vectors.masked_fill((rows == PAD).unsqueeze(1), 0.0)

    def forward(self, history: torch.Tensor, vectors: torch.Tensor | None = None) -> torch.Tensor:
        """history: (B, L) item indices, left-padded with 0 -> hidden states (B, L, d_model).

        `vectors` are the item vectors when the caller already has them (a frozen export).
        """
        vectors = self.item_vectors() if vectors is None else vectors
        attention_mask = (history != PAD).long()  # (B, L)
        # Positions count real items only, so left padding does not shift them.
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, L)
        inputs = nn.functional.embedding(history, vectors)  # (B, L, d_model)
        output = self.encoder(inputs_embeds=inputs, attention_mask=attention_mask, position_ids=position_ids)
        return output.last_hidden_state

    def next_item_logits(self, history: torch.Tensor, vectors: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n_items) scores for the item that follows each history (B, T), any T >= 1.

        Only the most recent `max_history` items are encoded.
        """
        vectors = self.item_vectors() if vectors is None else vectors
        last = self(history[:, -self.config.max_history:], vectors)[:, -1]  # (B, d_model)
        return last @ vectors.T


class TopKRecommender(nn.Module):
    """What is exported to ONNX: history (B, T) -> top-K item indices (B, K) and scores (B, K).

    The history may be a user's whole past (any length T, left-padded): the transformer reads
    its last `max_history` items, and every item in it is masked, so nothing the user already
    has is recommended. The padding index and items marked `excluded` (inactive) never are.
    """

    def __init__(self, model: SequentialRecommender, excluded: torch.Tensor, k: int) -> None:
        super().__init__()
        # GPT-2's eager attention, not SDPA: SDPA's padding mask exports as Where/IsNaN ops over
        # (B, heads, T, T) that took half of ONNX Runtime's scoring time; the math is the same
        # (export checks parity). This switches `model` itself, which the wrapper owns from here.
        model.encoder.set_attn_implementation("eager")
        self.model = model
        # Frozen at export: item vectors are constants of the graph, not recomputed per batch, and
        # exclusion is an added 0 / -inf row (a broadcast add is far cheaper than a masked select).
        with torch.no_grad():
            self.register_buffer("vectors", model.item_vectors().detach().clone())  # (n_items, d_model)
        self.register_buffer("exclusion", torch.zeros(len(excluded)).masked_fill(excluded.bool(), float("-inf")))
        self.k = k

    def forward(self, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.model.next_item_logits(history, self.vectors) + self.exclusion  # (B, n_items)
        scores = scores.scatter(1, history, float("-inf"))  # every seen item (and PAD, via 0s) out
        top_scores, top_items = scores.topk(self.k, dim=1)  # (B, K) each
        return top_items, top_scores


def fill_cold_ids(model: SequentialRecommender, positives: torch.Tensor, min_count: int = 5,
                  neighbours: int = 10) -> int:
    """Give rarely-seen items the id embedding of their nearest neighbours by text.

    Under the softmax every item that is a target somewhere is a negative at every step, so an item
    that is rarely a positive ends training with an id embedding pushed away from most users, and
    one never a positive has learned nothing of its own. Items with fewer than `min_count`
    positives get a blend of their own embedding and the mean id embedding of the `neighbours`
    well-trained items whose text is closest, weighted by how many positives they had (an item with
    none takes its neighbours' outright). Only worth doing where the text informs
    (`recmodel.textsignal`). Returns how many items changed.
    """
    counts = positives.float()  # (n_items,)
    warm = torch.nonzero(counts >= min_count).squeeze(1)
    cold = torch.nonzero((counts < min_count) & (torch.arange(len(counts)) != PAD)).squeeze(1)
    if len(warm) == 0 or len(cold) == 0:
        return 0
    with torch.no_grad():
        text = nn.functional.normalize(model.text_matrix, dim=1)  # (n_items, text_dim)
        similarity = text[cold] @ text[warm].T  # (n_cold, n_warm)
        nearest = similarity.topk(min(neighbours, len(warm)), dim=1).indices  # (n_cold, k)
        neighbour_ids = model.id_embedding.weight[warm[nearest]].mean(dim=1)  # (n_cold, d_model)
        own_weight = (counts[cold] / min_count).unsqueeze(1)  # (n_cold, 1)
        blended = own_weight * model.id_embedding.weight[cold] + (1 - own_weight) * neighbour_ids
        model.id_embedding.weight[cold] = blended
    return len(cold)


def warm_start(model: SequentialRecommender, parent_state: dict[str, torch.Tensor],
               parent_item_ids: torch.Tensor, item_ids: torch.Tensor) -> int:
    """Copy the champion's weights into `model`, mapping id embeddings by item_id.

    Items new since the champion keep a zero id embedding, i.e. start from their text.
    Returns how many item rows were carried over.
    """
    own = model.state_dict()
    for name, tensor in parent_state.items():
        if name in ("id_embedding.weight", "text_matrix") or name not in own:
            continue
        if own[name].shape == tensor.shape:
            own[name] = tensor
    parent_index = {int(i): row for row, i in enumerate(parent_item_ids.tolist()) if row != PAD}
    rows = [(row, parent_index[int(i)]) for row, i in enumerate(item_ids.tolist())
            if row != PAD and int(i) in parent_index]
    weights = torch.zeros_like(own["id_embedding.weight"])
    if rows:
        dst, src = zip(*rows)
        weights[list(dst)] = parent_state["id_embedding.weight"][list(src)]
    own["id_embedding.weight"] = weights
    model.load_state_dict(own)
    return len(rows)
