"""PairRM fidelity: apo_trainer.pairrm against llm-blender's own code, on random weights of PairRM's architecture.

PairRM's weights cannot be downloaded here, so both sides load one random checkpoint in llm-blender/PairRM's layout
(RankerConfig config.json with PairRM's lengths 1224/412, a tiny DeBERTa-v2 backbone with deberta-v3's relative
attention, a sentencepiece tokenizer, ``pytorch_model.bin`` written by llm-blender's CrossCompareReranker).

    python bench/pairrm_fidelity.py --blender-python /work/venvs/blender/bin/python [--dir DIR] [--ours-python PY]

1. In the llm-blender venv (llm-blender 0.0.2, transformers 4.x, sentencepiece): build the checkpoint, load it with
   ``Blender.loadranker`` and record ``Blender.compare(..., return_logits=True)`` (default mode "[A,B]+[B,A]") at
   batch size 1 and 4, mode "[A,B]" (one order) at batch size 1, and the token ids its collator builds.
2. In this project's venv (``--ours-python``, default this interpreter): ``apo_trainer.pairrm.load_pairrm`` on the
   same folder, the same numbers, batch size 8.
    python bench/pairrm_fidelity.py --speed     # pairs/s, batch 1 vs batched, on a scaled-down random PairRM

Exit 1 when a logit differs by more than 1e-5 or a token id differs (llm-blender at batch size 1 is the reference;
its batch-4 numbers differ on long inputs by design, see apo_trainer/pairrm.py).

The venv for step 1 (what was used here): python3 -m venv /work/venvs/blender; pip install torch==2.13.0
transformers==4.44.2 "numpy<2.3" sentencepiece protobuf dataclasses-json safetensors accelerate llm-blender==0.0.2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-5


def cases() -> list[tuple[str, str, str]]:
    words = [
        "the",
        "cat",
        "sat",
        "on",
        "the",
        "mat",
        "a",
        "dog",
        "ran",
        "why",
        "is",
        "sky",
        "blue",
        "good",
        "answer",
        "bad",
        "question",
    ]
    long = lambda n, k: " ".join(words[(i * k) % len(words)] for i in range(n))  # noqa: E731
    return [
        ("why is the sky blue", "because of scattering", "it is not"),
        ("why", "the cat sat on the mat", "the cat sat on the mat"),  # a tie
        ("a question[SEP] with a sep", "an [SEP] answer", "b"),
        ("tabs\tand\nnewlines  here", "good answer", ""),
        ("unicode é ü 日本", "naïve café", "bad answer"),
        (long(1500, 7), "short", "a dog ran"),  # the prompt is truncated to 1224 tokens
        ("short prompt", long(700, 3), long(650, 5)),  # candidates truncated to 412 + half the prompt's room
        (long(1000, 11), long(500, 2), long(480, 13)),  # both
        ("q", "a", "b"),
        ("the cat", long(40, 3), long(45, 7)),
    ]


def blender_side(folder: Path) -> None:
    """Runs in llm-blender's venv: build the random checkpoint, then score the cases with llm-blender."""
    import numpy as np
    import sentencepiece as spm
    import torch
    from llm_blender.blender.blender import Blender
    from llm_blender.blender.blender_utils import load_ranker
    from llm_blender.pair_ranker.config import RankerConfig
    from transformers import DebertaV2Config, DebertaV2Model, DebertaV2Tokenizer, DebertaV2TokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    text = "\n".join(" ".join(c) for c in cases())
    (folder / "corpus.txt").write_text(text * 3, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"),
        model_prefix=str(folder / "spm"),
        vocab_size=120,
        hard_vocab_limit=False,
        model_type="unigram",
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        pad_piece="[PAD]",
        bos_piece="[CLS]",
        eos_piece="[SEP]",
        unk_piece="[UNK]",
        user_defined_symbols=["[MASK]"],
        minloglevel=2,
    )
    backbone = folder / "backbone"
    DebertaV2Tokenizer(str(folder / "spm.model")).save_pretrained(backbone)
    DebertaV2TokenizerFast.from_pretrained(str(backbone)).save_pretrained(backbone)  # tokenizer.json as well
    torch.manual_seed(0)
    config = DebertaV2Config(
        vocab_size=128,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=512,
        relative_attention=True,
        position_buckets=256,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        pos_att_type=["p2c", "c2p"],
        position_biased_input=False,
        max_relative_positions=-1,
        type_vocab_size=0,
    )
    DebertaV2Model(config).save_pretrained(backbone)
    ranker_dir = folder / "ranker"
    ranker_dir.mkdir(exist_ok=True)
    cfg = {
        "ranker_type": "pairranker",
        "model_type": "deberta",
        "model_name": str(backbone),
        "source_maxlength": 1224,
        "candidate_maxlength": 412,
        "n_tasks": 1,
        "drop_out": 0.05,
        "fp16": True,
        "inference_mode": "bubble",
    }
    ranker, _, _ = load_ranker(RankerConfig.from_dict({**cfg, "load_checkpoint": None}))
    torch.manual_seed(1)
    for p in ranker.parameters():  # every weight random (the backbone too), the head larger so logits spread
        torch.nn.init.normal_(p, std=0.5 if p.dim() == 1 or p.shape[0] < 100 else 0.05)
    torch.save(ranker.state_dict(), ranker_dir / "pytorch_model.bin")
    (ranker_dir / "config.json").write_text(json.dumps(cfg, indent=1))

    blender = Blender()
    blender.loadranker(str(ranker_dir), device="cpu")
    ps, a, b = (list(c) for c in zip(*cases()))
    out = {
        "compare_b1": np.asarray(blender.compare(ps, a, b, batch_size=1, return_logits=True)).tolist(),
        "compare_b4": np.asarray(blender.compare(ps, a, b, batch_size=4, return_logits=True)).tolist(),
        "one_order_b1": np.asarray(blender.compare(ps, a, b, batch_size=1, return_logits=True, mode="[A,B]")).tolist(),
    }
    ids = []
    collate, model = blender.ranker_collator, blender.ranker
    for p, x, y in cases():
        batch = collate([{"source": p, "candidates": [x, y]}])
        c1, c2 = batch["candidate_ids"][:, 0].clone(), batch["candidate_ids"][:, 1].clone()
        c1[c1 == blender.ranker_tokenizer.cand_prefix_id] = blender.ranker_tokenizer.cand1_prefix_id
        c2[c2 == blender.ranker_tokenizer.cand_prefix_id] = blender.ranker_tokenizer.cand2_prefix_id
        cat, mask = model.cat_ids(
            batch["source_ids"],
            batch["source_attention_mask"],
            c1,
            batch["candidate_attention_mask"][:, 0],
            c2,
            batch["candidate_attention_mask"][:, 1],
        )
        ids.append(cat[0][mask[0].bool()].tolist())
    out["ids"] = ids
    import llm_blender
    import transformers

    out["versions"] = {"transformers": transformers.__version__, "torch": torch.__version__}
    out["llm_blender"] = getattr(llm_blender, "__version__", "0.0.2")
    (folder / "blender.json").write_text(json.dumps(out), encoding="utf-8")


def our_side(folder: Path) -> None:
    """Runs in this project's venv: the same numbers from apo_trainer.pairrm."""
    import torch
    import transformers

    from apo_trainer.pairrm import load_pairrm

    rm = load_pairrm(str(folder / "ranker"), batch_size=8)
    ps, a, b = (list(c) for c in zip(*cases()))
    out = {
        "compare": rm.compare(ps, a, b),
        "one_order": rm.logits(ps, a, b),
        "ids": [rm.encode(p, x, y)[0] for p, x, y in cases()],
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
    }
    (folder / "ours.json").write_text(json.dumps(out), encoding="utf-8")


def report(folder: Path) -> int:
    theirs = json.loads((folder / "blender.json").read_text(encoding="utf-8"))
    ours = json.loads((folder / "ours.json").read_text(encoding="utf-8"))
    print(f"llm-blender side: {theirs['versions']}; ours: {ours['versions']}")
    same_ids = [x == y for x, y in zip(theirs["ids"], ours["ids"])]
    lens = [len(x) for x in theirs["ids"]]
    print(f"token ids identical: {sum(same_ids)}/{len(same_ids)} cases (sequence lengths {lens})")
    worst = 0.0
    for name, t_key, o_key in (
        ("compare (both orders), llm-blender batch 1", "compare_b1", "compare"),
        ("one order [A,B], llm-blender batch 1", "one_order_b1", "one_order"),
        ("compare, llm-blender batch 4 (informative)", "compare_b4", "compare"),
    ):
        diff = max(abs(x - y) for x, y in zip(theirs[t_key], ours[o_key]))
        scale = max(abs(x) for x in theirs[t_key])
        print(f"{name}: max |diff| {diff:.3g} (largest |logit| {scale:.3g})")
        if "informative" not in name:
            worst = max(worst, diff)
    ok = all(same_ids) and worst <= TOL
    print(f"{'PASS' if ok else 'FAIL'}: tolerance {TOL}")
    return 0 if ok else 1


def speed(pairs: int = 48, threads: int = 2) -> None:
    """Pairs/s of apo_trainer.pairrm at batch 1, 8 and 16 on random weights: deberta-v3-large's layout scaled down
    (hidden 256, 4 layers, 4 heads instead of 1024, 24, 16; 2 CPU cores cannot run the real shape in a useful time),
    prompts of ~120 tokens and answers of ~150-300 tokens (the lengths vary, so batches carry padding)."""
    import random
    import time

    import torch
    from transformers import DebertaV2Config, DebertaV2Tokenizer

    from apo_trainer.pairrm import PairRM, PairRMModel

    torch.set_num_threads(threads)
    words = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "why", "is", "sky", "blue", "good", "bad"]
    vocab = [("[PAD]", 0.0), ("[CLS]", 0.0), ("[SEP]", 0.0), ("[UNK]", 0.0), ("[MASK]", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -3.0) for w in words]
    tok = DebertaV2Tokenizer(vocab=vocab, unk_id=3)
    config = DebertaV2Config(
        vocab_size=len(tok) + 4,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        relative_attention=True,
        position_buckets=256,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        pos_att_type=["p2c", "c2p"],
        position_biased_input=False,
        max_relative_positions=-1,
        type_vocab_size=0,
    )
    torch.manual_seed(0)
    rm = PairRM(PairRMModel(config), tok)
    rng = random.Random(0)
    text = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    ps = [text(120) for _ in range(pairs)]
    a, b = [text(rng.randint(150, 300)) for _ in range(pairs)], [text(rng.randint(150, 300)) for _ in range(pairs)]
    print(f"{pairs} pairs, {threads} threads, torch {torch.__version__}; sequence lengths ~420-720 tokens")
    for bs in (1, 8, 16):
        rm.batch_size = bs
        rm.logits(ps[:bs], a[:bs], b[:bs])  # warm-up
        t0 = time.perf_counter()
        rm.logits(ps, a, b)
        dt = time.perf_counter() - t0
        print(f"batch {bs:2d}: {pairs / dt:.1f} pairs/s ({dt:.1f} s)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blender-python", default="/work/venvs/blender/bin/python")
    ap.add_argument("--ours-python", default=sys.executable)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/pairrm-fidelity"))
    ap.add_argument("--stage", choices=["blender", "ours"], help=argparse.SUPPRESS)
    ap.add_argument("--speed", action="store_true", help="pairs/s at batch 1 vs batched (this venv only)")
    args = ap.parse_args()
    if args.speed:
        sys.path.insert(0, str(ROOT))
        speed()
        return 0
    if args.stage == "blender":
        blender_side(args.dir)
        return 0
    if args.stage == "ours":
        our_side(args.dir)
        return 0
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for py, stage in ((args.blender_python, "blender"), (args.ours_python, "ours")):
        cmd = [py, str(Path(__file__).resolve()), "--stage", stage, "--dir", str(args.dir)]
        subprocess.run(cmd, check=True, env=env if stage == "ours" else None)
    return report(args.dir)


if __name__ == "__main__":
    sys.exit(main())
