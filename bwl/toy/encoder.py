"""The toy CLIP: a small ``CLIPModel`` trained contrastively on the toy world's *seen* concepts (images and their tag
captions from the pretraining sampler, so the held-out identity and style are never shown, as real CLIP never saw
your subject). It runs the reference metrics through the same transformers classes, processor and tokenizer as
``openai/clip-vit-large-patch14``, so the toy world can check what those metrics track against the probe's truth.

``python -m bwl toy-clip`` retrains it into ``data/toy-clip``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from bwl.sd.pipeline import quiet_loading
from bwl.sd.tokenizer import word_tokenizer
from bwl.toy.assets import DATA
from bwl.toy.world import SIZE, pretraining_caption, render, sample_character, vocabulary

TOY_CLIP = DATA / "toy-clip"
EXTRA_WORDS = ("person", "character", "photo", "of")  # the plain words the prompt metric may put for a trigger


def toy_clip_model(vocab_size: int, seed: int = 0) -> CLIPModel:
    """A small CLIP for 32 px images: 4-px patches, 4 vision and 2 text layers, width 64."""
    torch.manual_seed(seed)
    return CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                           image_size=SIZE, patch_size=4),
        projection_dim=64))


def train_toy_clip(out: str | Path = TOY_CLIP, steps: int = 600, batch_size: int = 128, pool: int = 8192,
                   seed: int = 0, lr: float = 2e-3, log_every: int = 100) -> dict:
    """Train the toy CLIP on seen concepts only and ``save_pretrained`` it (model, image processor, tokenizer) with
    a report of its retrieval accuracy on fresh seen pairs. Images come from a pool of ``pool`` renders made once;
    each step draws a batch from it with fresh random tag subsets as captions."""
    out = Path(out)
    tokenizer = word_tokenizer([*vocabulary(), *EXTRA_WORDS])
    processor = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    model = toy_clip_model(len(tokenizer.get_vocab()), seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    started = time.time()

    def renders(rng: np.random.Generator, count: int):
        characters = [sample_character(rng) for _ in range(count)]  # seen concepts only
        images = [render(c, int(rng.integers(1 << 31))) for c in characters]
        return characters, processor(images=images, return_tensors="pt")["pixel_values"]

    characters, pixels_pool = renders(np.random.default_rng([seed, 11]), pool)

    def captions(rng: np.random.Generator, chosen) -> dict:
        text = [pretraining_caption(c, rng, empty_rate=0.0) or ", ".join(c.tags()) for c in chosen]
        return tokenizer(text, padding=True, return_tensors="pt")

    def batch(step: int):
        rng = np.random.default_rng([seed, 12, step])
        rows = rng.choice(pool, batch_size, replace=False)
        return pixels_pool[rows], captions(rng, [characters[i] for i in rows])

    model.train()
    for step in range(steps):
        pixels, tokens = batch(step)
        loss = model(pixel_values=pixels, **tokens, return_loss=True).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % log_every == 0:
            print(f"toy-clip step {step + 1}/{steps} loss {loss.item():.4f} "
                  f"({(time.time() - started) / (step + 1):.2f} s/step)", flush=True)
    model.eval()
    with torch.no_grad():
        rng = np.random.default_rng([seed, 13])
        fresh, pixels = renders(rng, batch_size)
        logits = model(pixel_values=pixels, **captions(rng, fresh)).logits_per_image
    report = {"steps": steps, "batch_size": batch_size, "minutes": round((time.time() - started) / 60, 1),
              "retrieval_top1_fresh_seen": float((logits.argmax(1) == torch.arange(len(logits))).float().mean()),
              "command": "python -m bwl toy-clip"}
    with quiet_loading():
        model.save_pretrained(out)
        processor.save_pretrained(out)
        tokenizer.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
