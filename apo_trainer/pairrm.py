"""PairRM (llm-blender's pairwise ranker) on plain transformers, batched; llm-blender itself is not needed.

PairRM is a DeBERTa-v3 encoder reading one sequence that holds the prompt and two candidates, and a small head
that scores each candidate against the prompt. This module reimplements what llm-blender 0.0.2 runs for
``Blender.compare`` (``pair_ranker/collator.py`` CrossCompareCollator, ``pair_ranker/ranker.py``
CrossCompareReranker ``cat_ids``/``_forward``/``_full_predict``, ``gpt_eval/utils.py`` get_scores_from_cmps):

- Tokens: the four markers ``<|source|>``, ``<|candidate1|>``, ``<|candidate2|>``, ``<|candidate|>`` are added to
  the backbone's tokenizer (in that order, as llm-blender does). The prompt becomes ``<|source|>`` + prompt, the
  tokenizer's sep token (``[SEP]``) in the text replaced by a space, tokenized with special tokens and truncated to
  ``source_maxlength`` (1224) tokens: ``[CLS] <|source|> ... [SEP]``. Each candidate becomes ``<|candidate|>`` +
  text, truncated to ``candidate_maxlength + (source_maxlength - len(source)) // 2`` tokens (412 plus half the
  room the prompt left), and its marker is then swapped for ``<|candidate1|>`` or ``<|candidate2|>``.
- The sequence is source + candidate 1 + candidate 2, padding at the end; the encoder's last hidden states at the
  three marker positions are pooled (no averaging: one vector each).
- Head (``head_layer``): Dropout, Linear(2H, H), Tanh, Dropout, Linear(H, n_tasks), applied to [source; cand1] and
  [source; cand2]; the pair's logit is ``L(a, b) = mean over tasks of (head(src, a) - head(src, b))``.
- ``Blender.compare(..., return_logits=True)`` (its default mode "[A,B]+[B,A]") returns ``L(a, b) - L(b, a)``:
  :meth:`PairRM.compare` returns the same number, and the oracle's P(a beats b) is its sigmoid.

One deliberate difference: llm-blender truncates the candidates of a batch by the batch's longest prompt, so its
scores change with the batch; here each row is truncated by its own prompt, which is what llm-blender does at batch
size 1 (SPPO's setting). Rows are padded at the end, so a row's logit does not depend on its batch (to float
rounding). Marker positions are taken from the layout (first marker of each part), so a marker string inside a
user's text does not shift them (llm-blender would fail on such a text).

Checkpoint layouts read: llm-blender's (``config.json`` with ``ranker_type: pairranker``, ``model_name`` naming
the backbone whose tokenizer and config are used, weights ``pytorch_model.bin`` or ``model.safetensors`` with
``pretrained_model.*`` and ``head_layer.*`` keys: ``llm-blender/PairRM``) and the transformers one
(``llm-blender/PairRM-hf``: a DebertaV2 ``config.json`` with the tokenizer in the same folder, same keys).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from apo_merge.errors import first_line
from apo_trainer.errors import ConfigError

SOURCE, CAND1, CAND2, CAND = "<|source|>", "<|candidate1|>", "<|candidate2|>", "<|candidate|>"
SOURCE_MAXLENGTH, CANDIDATE_MAXLENGTH = 1224, 412  # PairRM's config.json


def make_head(hidden: int, n_tasks: int = 1, drop_out: float = 0.05) -> nn.Sequential:
    """llm-blender's ``head_layer``; the layer indices (1 and 4) are the checkpoint's key names."""
    return nn.Sequential(
        nn.Dropout(drop_out), nn.Linear(2 * hidden, hidden), nn.Tanh(), nn.Dropout(drop_out), nn.Linear(hidden, n_tasks)
    )


class PairRMModel(nn.Module):
    """Backbone (``pretrained_model``) and head (``head_layer``): the checkpoint's parameter names."""

    def __init__(self, config: Any, n_tasks: int = 1, drop_out: float = 0.05) -> None:
        from transformers import DebertaV2Model

        super().__init__()
        self.pretrained_model = DebertaV2Model(config)
        self.head_layer = make_head(config.hidden_size, n_tasks, drop_out)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, marks: torch.Tensor) -> torch.Tensor:
        """L per row: ``marks`` holds each row's (source, candidate 1, candidate 2) marker positions."""
        encs = self.pretrained_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        rows = torch.arange(encs.shape[0], device=encs.device)
        src, c1, c2 = (encs[rows, marks[:, k]] for k in range(3))
        left = self.head_layer(torch.cat([src, c1], dim=-1))
        right = self.head_layer(torch.cat([src, c2], dim=-1))
        return (left - right).mean(dim=-1)


class PairRM:
    """A loaded PairRM: :meth:`logits` gives L(a, b) for one order, :meth:`compare` llm-blender's L(a,b) - L(b,a).

    ``batch_size`` pairs go through the encoder at once, longest first; each ordered pair is run once per call.
    """

    def __init__(
        self,
        model: PairRMModel,
        tokenizer: Any,
        *,
        lengths: tuple[int, int] = (SOURCE_MAXLENGTH, CANDIDATE_MAXLENGTH),
        device: torch.device | str = "cpu",
        batch_size: int = 16,
    ) -> None:
        self.tokenizer = tokenizer
        self.tokenizer.add_tokens([SOURCE, CAND1, CAND2, CAND])  # no-op where the tokenizer has them already
        self.ids = {m: tokenizer.convert_tokens_to_ids(m) for m in (SOURCE, CAND1, CAND2, CAND)}
        rows = model.pretrained_model.get_input_embeddings().weight.shape[0]
        if max(self.ids.values()) >= rows:
            raise ConfigError(
                f"PairRM: the tokenizer's marker ids {sorted(self.ids.values())} do not fit the checkpoint's "
                f"{rows} embedding rows; the tokenizer is not the one the checkpoint was trained with",
                exit_code=1,
            )
        self.sep = tokenizer.sep_token or tokenizer.eos_token
        self.source_max, self.candidate_max = lengths
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.batch_size = batch_size

    def _ids(self, text: str, limit: int) -> list[int]:
        return list(self.tokenizer(text.replace(self.sep, " "), max_length=limit, truncation=True)["input_ids"])

    def encode(self, prompt: str, a: str, b: str) -> tuple[list[int], tuple[int, int, int]]:
        """Token ids of one (prompt, a, b) and its three marker positions (llm-blender's collator + cat_ids)."""
        src = self._ids(SOURCE + prompt, self.source_max)
        room = self.candidate_max + (self.source_max - len(src)) // 2
        c1, c2 = self._ids(CAND + a, room), self._ids(CAND + b, room)
        at = (src.index(self.ids[SOURCE]), c1.index(self.ids[CAND]), c2.index(self.ids[CAND]))
        c1[at[1]], c2[at[2]] = self.ids[CAND1], self.ids[CAND2]
        return src + c1 + c2, (at[0], len(src) + at[1], len(src) + len(c1) + at[2])

    @torch.no_grad()
    def logits(self, prompts: list[str], first: list[str], second: list[str]) -> list[float]:
        """L(first, second) per row: one order, one encoder pass per row."""
        encoded = [self.encode(p, a, b) for p, a, b in zip(prompts, first, second, strict=True)]
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
        out = [math.nan] * len(encoded)
        pad = self.tokenizer.pad_token_id or 0
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            width = max(len(encoded[i][0]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, : len(encoded[i][0])] = torch.tensor(encoded[i][0])
                mask[r, : len(encoded[i][0])] = 1
            marks = torch.tensor([encoded[i][1] for i in idx], dtype=torch.long)
            got = self.model(ids.to(self.device), mask.to(self.device), marks.to(self.device)).float().tolist()
            for i, v in zip(idx, got, strict=True):
                out[i] = v
        return out

    def compare(self, prompts: list[str], responses_a: list[str], responses_b: list[str]) -> list[float]:
        """llm-blender's ``Blender.compare(..., return_logits=True)``: L(a, b) - L(b, a) per row (> 0: a is better).

        Both orders of every row go through :meth:`logits` in one call (each distinct ordered pair once)."""
        keys = list(zip(prompts, responses_a, responses_b, strict=True))
        wanted = list(dict.fromkeys([*keys, *((p, b, a) for p, a, b in keys)]))
        got = dict(zip(wanted, self.logits(*(list(c) for c in zip(*wanted))), strict=True)) if wanted else {}
        return [got[(p, a, b)] - got[(p, b, a)] for p, a, b in keys]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(folder / "model.safetensors"))
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise ConfigError(
        f"PairRM: {folder} holds neither model.safetensors nor pytorch_model.bin; point the oracle at a PairRM "
        "checkpoint folder (llm-blender/PairRM's layout)",
        exit_code=1,
    )


def resolve_folder(ref: str) -> Path:
    """A local folder as it is, else a Hub id downloaded (or found in the cache) by huggingface_hub."""
    if Path(ref).is_dir():
        return Path(ref)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(ref))


def load_pairrm(
    ref: str, *, device: torch.device | str = "cpu", batch_size: int = 16, dtype: torch.dtype | None = None
) -> PairRM:
    """PairRM from a checkpoint folder or Hub id (llm-blender's layout or the ``-hf`` one), see the module doc."""
    from transformers import AutoTokenizer, DebertaV2Config

    folder = resolve_folder(ref)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if config.get("ranker_type") is not None:  # llm-blender's RankerConfig: backbone named by model_name
        if config["ranker_type"] != "pairranker" or not str(config.get("model_type", "")).startswith("deberta"):
            raise ConfigError(
                f"PairRM: {ref} is a {config['ranker_type']!r} ranker on {config.get('model_type')!r}; only "
                "llm-blender's DeBERTa pairranker (PairRM) is supported",
                exit_code=1,
            )
        backbone = config["model_name"]
        backbone = str(resolve_folder(backbone)) if not Path(backbone).is_dir() else backbone
    else:
        backbone = str(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(backbone)
    except Exception as e:  # transformers 5 reads deberta-v3's spm.model only with sentencepiece and protobuf
        raise ConfigError(
            f"PairRM: cannot load the tokenizer of {backbone} ({first_line(e, typed=True)}); deberta-v3's "
            "tokenizer (spm.model) needs sentencepiece and protobuf: pip install 'apo-merge[pairrm]'",
            exit_code=1,
        ) from e
    net = DebertaV2Config.from_pretrained(backbone)
    state = _weights(folder)
    embed = state.get("pretrained_model.embeddings.word_embeddings.weight")
    if embed is None or "head_layer.4.weight" not in state:
        raise ConfigError(
            f"PairRM: {ref}'s weights have no pretrained_model.embeddings or head_layer; it is not a PairRM checkpoint",
            exit_code=1,
        )
    net.vocab_size = embed.shape[0]  # llm-blender resized the embeddings to the tokenizer plus the markers
    model = PairRMModel(net, n_tasks=state["head_layer.4.weight"].shape[0], drop_out=config.get("drop_out", 0.05))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"PairRM: {ref}'s weights do not match the DeBERTa-v2 ranker (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); check that it is a PairRM checkpoint",
            exit_code=1,
        )
    if dtype is None and torch.device(device).type in ("cuda", "mps") and config.get("fp16"):
        dtype = torch.float16  # llm-blender's loadranker: half precision on an accelerator when the config says fp16
    if dtype is not None:
        model = model.to(dtype)
    lengths = (
        int(config.get("source_maxlength") or SOURCE_MAXLENGTH),
        int(config.get("candidate_maxlength") or CANDIDATE_MAXLENGTH),
    )
    return PairRM(model, tokenizer, lengths=lengths, device=device, batch_size=batch_size)
