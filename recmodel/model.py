"""The recommender: a causal transformer (Hugging Face GPT-2 blocks) over a user's recent items.

An item's vector fuses a learned id embedding with a projection of its MiniLM text embedding:

    item_vector[i] = id_embedding[i] + W_text @ text_embedding[i]

Id embeddings start at zero, so an item nobody has interacted with yet (or that joined the
catalog after the last training run) is represented by its text alone and can still be
recommended; interactions then learn a residual on top. After training, items with few
positives borrow the id embedding of their text neighbours (`fill_cold_ids`). Scores are dot products between the
transformer's hidden state at the last history position and every item vector, trained with
full-catalog softmax cross-entropy on the next item.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import GPT2Config, GPT2Model

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

    def to_dict(self) -> dict:
        return asdict(self)


class SequentialRecommender(nn.Module):
    def __init__(self, config: ModelConfig, text_matrix: torch.Tensor) -> None:
        super().__init__()
        self.config = config
        self.id_embedding = nn.Embedding(config.n_items, config.d_model, padding_idx=PAD)
        nn.init.zeros_(self.id_embedding.weight)
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
        ))

    def item_vectors(self) -> torch.Tensor:
        """(n_items, d_model) representation of every item; row 0 (padding) is zero."""
        vectors = self.id_embedding.weight + self.text_projection(self.text_matrix)
        return vectors.masked_fill(self._pad_row_mask(vectors), 0.0)

    def _pad_row_mask(self, vectors: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(vectors.shape[0], device=vectors.device).unsqueeze(1)  # (n_items, 1)
        return rows == PAD

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

    Under full softmax every item is a negative at every step, so an item that is rarely or
    never a positive ends training with an id embedding pushed away from every user: a cold
    item would rank below random. Items with fewer than `min_count` positives get a blend of
    their own embedding and the mean id embedding of the `neighbours` well-trained items whose
    text is closest, weighted by how many positives they had. Returns how many items changed.
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
