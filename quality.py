"""The data-quality pipeline of GLM-4.1V-Thinking's pretraining data (paper §3.1): heuristic filters, exact and
near-duplicate removal, a pluggable relevance scorer, concept-balanced resampling and a recaptioning hook, over a
dataset in any form data.py reads.

    python quality.py in.jsonl out.jsonl --scorer mymod:clip_score --balance-t 20 --rejects rejects.jsonl

An offline tool: training never imports it. Nothing is dropped silently — every dropped line is counted by reason
(and written to `--rejects` with its reason), and a broken image never stops the run.
"""
import argparse
import hashlib
import json
import os
import random
import re

import numpy as np
from PIL import Image
from tqdm import tqdm

import data

STOPWORDS = frozenset("a an the and or but of in on at to with for from by as is are was were be been this that "
                      "these those it its there here image picture photo shows showing shown".split())


def phash(image: Image.Image) -> int:
    """64-bit perceptual hash: the signs of the 8×8 lowest DCT frequencies of a 32×32 grey thumbnail against their
    median. Re-encoding, small resizes and mild colour changes keep it within a few bits."""
    grey = np.asarray(data.to_rgb(image).convert("L").resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float64)
    n = np.arange(32)
    basis = np.cos(np.pi * (2 * n[None, :] + 1) * n[:, None] / 64)  # DCT-II rows: basis[k, x]
    low = (basis @ grey @ basis.T)[:8, :8].flatten()
    bits = low > np.median(low[1:])  # the DC term (mean brightness) does not vote on the threshold
    return int("".join("1" if b else "0" for b in bits), 2)


class NearDuplicateIndex:
    """Perceptual hashes kept so far. Two hashes within Hamming distance d agree on at least one of d+1 bands
    (pigeonhole), so a lookup compares only against hashes sharing a band instead of against all."""

    def __init__(self, max_distance: int):
        self.max_distance = max_distance
        bands = max_distance + 1
        edges = [round(64 * i / bands) for i in range(bands + 1)]
        self.masks = [(((1 << (b - a)) - 1) << a, a) for a, b in zip(edges[:-1], edges[1:])]
        self.buckets = [dict() for _ in self.masks]

    def find(self, h: int):
        """A kept hash within max_distance of h, or None."""
        for (mask, _), bucket in zip(self.masks, self.buckets):
            for other in bucket.get(h & mask, ()):
                if bin(h ^ other).count("1") <= self.max_distance:
                    return other
        return None

    def add(self, h: int):
        for (mask, _), bucket in zip(self.masks, self.buckets):
            bucket.setdefault(h & mask, []).append(h)


def _load_for_filter(path, max_image_pixels: int):
    """(image, None) or (None, reason) — never raises on a bad file. `path` may be an opened image (a data: URL)."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_image_pixels
    try:
        if isinstance(path, Image.Image):
            path.load()
            return path, None
        return data.open_image(path), None
    except FileNotFoundError:
        return None, "missing_file"
    except data.BadData as e:
        if e.reason == "decompression_bomb":
            return None, e.reason
        return None, "truncated" if "truncated" in str(e.__cause__).lower() else "unreadable"
    except (OSError, SyntaxError) as e:  # an image opened from a data: URL, failing only now
        return None, "truncated" if "truncated" in str(e).lower() else "unreadable"
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _record_text(sample: dict) -> str:
    """The text a record pairs with its images: the caption, or every message of a conversation."""
    if "messages" not in sample:
        return sample["text"]
    return "\n".join(m["content"] if isinstance(m["content"], str) else " ".join(
        i.get("text", "") for i in m["content"]) for m in sample["messages"])


def concepts_of(text: str, vocabulary=None) -> set:
    """The concepts a text mentions: entries of `vocabulary` (words or phrases) found in it, or without one its
    content words (lower-case, 3+ letters, no stop words)."""
    lower = text.lower()
    if vocabulary is not None:
        words = set(re.findall(r"[a-z0-9]+", lower))
        return {c for c in vocabulary if (c in words if " " not in c else c in lower)}
    return {w for w in re.findall(r"[a-z]{3,}", lower) if w not in STOPWORDS}


def _heuristic_problem(images, text: str, min_side, max_aspect, solid_std, min_text_chars, max_text_chars):
    """The first heuristic a line fails (paper §3.1: resolution, aspect ratio, blank images, text length), or None."""
    for image in images:
        w, h = image.size
        if min(w, h) < min_side:
            return "too_small"
        if max(w, h) / min(w, h) > max_aspect:
            return "aspect_ratio"
        if np.asarray(data.to_rgb(image).convert("L"), dtype=np.float32).std() < solid_std:
            return "solid_color"
    if not min_text_chars <= len(text.strip()) <= max_text_chars:
        return "text_length"
    return None


class _Duplicates:
    """Exact (identical pixels, or identical text without images) and near (perceptual hash) duplicates of the lines
    kept so far."""

    def __init__(self, phash_distance: int):
        self.exact, self.near = set(), NearDuplicateIndex(phash_distance)

    def check(self, images, text: str):
        """(reason or None, the keys that `add` records)."""
        exact = hashlib.blake2b(b"".join(im.mode.encode() + str(im.size).encode() + im.tobytes() for im in images)
                                or text.encode(), digest_size=16).digest()
        hashes = [phash(im) for im in images]
        if exact in self.exact:
            return "exact_duplicate", None
        if any(self.near.find(h) is not None for h in hashes):
            return "near_duplicate", None
        return None, (exact, hashes)

    def add(self, keys):
        self.exact.add(keys[0])
        for h in keys[1]:
            self.near.add(h)


def _concept_balance(kept, balance_t: int, vocabulary, seed: int, drop) -> list:
    """MetaCLIP-style resampling: a concept mentioned by n > t kept lines selects each with probability t/n, and a
    line stays if any of its concepts selects it (lines without a concept stay)."""
    concepts = [concepts_of(_record_text(sample), vocabulary) for _, _, sample in kept]
    counts = {}
    for cs in concepts:
        for c in cs:
            counts[c] = counts.get(c, 0) + 1
    balanced = []
    for (lineno, obj, sample), cs in zip(kept, concepts):
        rng = random.Random(data.stable_hash("balance", seed, lineno))
        if not cs or any(rng.random() < balance_t / counts[c] for c in sorted(cs)):
            balanced.append((lineno, obj, sample))
        else:
            drop(lineno, json.dumps(obj), "resampled_out")
    return balanced


def _recaptioned(obj: dict, sample: dict, recaption):
    """The line with its caption rewritten by `recaption` (the old one kept as original_text); raises on failure."""
    image = sample["image"] if isinstance(sample["image"], Image.Image) else data.open_image(sample["image"])
    new = recaption(image, sample["text"])
    return {**obj, "text": str(new), "original_text": sample["text"]}


def quality_filter(in_path, out_path, *, min_side: int = 32, max_aspect: float = 20.0, min_text_chars: int = 2,
                   max_text_chars: int = 20_000, solid_std: float = 2.0, dedup: bool = True,
                   phash_distance: int = 4, scorer=None, min_score: float = 0.3, balance_t: int = None,
                   concepts=None, recaption=None, max_image_pixels: int = 89_478_485, rejects=None, seed: int = 0,
                   progress: bool = True) -> dict:
    """Filter a dataset (paper §3.1; JSONL or a JSON array, the JsonlSource forms) and write the kept records, in
    order, as JSONL to `out_path`:
    1. heuristics — images at least `min_side` px on the short side, aspect ratio at most `max_aspect`, not one
       solid colour (grey std < `solid_std`), text length within [min_text_chars, max_text_chars];
    2. de-duplication — exact (identical pixels) and near (perceptual hash within `phash_distance` bits);
    3. relevance — `scorer(image, text) -> float` (e.g. a CLIP similarity), keep when ≥ `min_score`;
    4. concept-balanced resampling (MetaCLIP-style) when `balance_t` is set — head concepts are thinned and
       long-tail ones kept whole (`concepts`: the vocabulary; default: content words);
    5. recaptioning — `recaption(image, text) -> str` rewrites caption pairs' text (the old one is kept as
       "original_text").
    Unparseable lines, missing, unreadable, truncated or decompression-bomb images are dropped and counted.
    Returns {"read", "kept", "dropped": {reason: count}}; `rejects` (a path) receives every dropped line with its
    reason."""
    in_path, out_path = os.fspath(in_path), os.fspath(out_path)
    if not os.path.exists(in_path):
        raise FileNotFoundError(f"input not found: {in_path}")
    root = os.path.dirname(os.path.abspath(in_path))
    vocabulary = None if concepts is None else {c.strip().lower() for c in concepts if c.strip()}
    dropped, kept, duplicates = {}, [], _Duplicates(phash_distance)  # kept: (lineno, object, sample)
    reject_file = open(rejects, "w", encoding="utf-8") if rejects else None

    def drop(lineno, raw, reason, detail=""):
        dropped[reason] = dropped.get(reason, 0) + 1
        if reject_file:
            reject_file.write(json.dumps({"line": lineno, "reason": reason, "detail": detail, "raw": raw}) + "\n")

    lines = list(data.read_records(in_path))
    for lineno, raw, obj in tqdm(lines, desc="filter", unit="line", disable=not progress):
        if isinstance(obj, json.JSONDecodeError):
            drop(lineno, raw, "bad_json", obj.msg)
            continue
        try:
            sample = data.parse_record(obj, root)
        except FileNotFoundError as e:
            drop(lineno, raw, "missing_file", str(e))
            continue
        except (ValueError, TypeError, KeyError) as e:
            drop(lineno, raw, "bad_record", str(e))
            continue
        loaded = [_load_for_filter(p, max_image_pixels)
                  for p in sample.get("images") or ([sample["image"]] if "image" in sample else [])]
        reason = next((why for _, why in loaded if why), None)
        images, text, keys = [im for im, _ in loaded], _record_text(sample), None
        reason = reason or _heuristic_problem(images, text, min_side, max_aspect, solid_std, min_text_chars,
                                              max_text_chars)
        if not reason and dedup:
            reason, keys = duplicates.check(images, text)
        if not reason and scorer is not None and images:
            try:
                reason = "low_relevance" if min(float(scorer(im, text)) for im in images) < min_score else None
            except Exception as e:  # a broken scorer must not lose the run; the line is counted
                drop(lineno, raw, "scorer_error", repr(e))
                continue
        if reason:
            drop(lineno, raw, reason)
            continue
        if keys is not None:
            duplicates.add(keys)
        kept.append((lineno, obj, sample))
    if balance_t is not None:
        kept = _concept_balance(kept, balance_t, vocabulary, seed, drop)
    with open(out_path, "w", encoding="utf-8") as out:
        for lineno, obj, sample in kept:
            if recaption is not None and "image" in sample and "messages" not in sample:
                try:
                    obj = _recaptioned(obj, sample, recaption)
                except Exception as e:  # keep the line with its old caption, but say so
                    drop(lineno, None, "recaption_failed_kept", repr(e))
            out.write(json.dumps(obj, ensure_ascii=False) + "\n")
    if reject_file:
        reject_file.close()
    return {"read": len(lines), "kept": len(kept),
            "dropped": dict(sorted(dropped.items(), key=lambda kv: -kv[1]))}


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def main(argv=None):
    f = argparse.ArgumentParser(description="Clean a dataset (paper §3.1): heuristics, de-duplication, relevance, "
                                            "concept balance, recaptioning")
    f.add_argument("input", help="input JSONL (conversations or {image, text} caption pairs)")
    f.add_argument("output", help="where the kept lines go")
    f.add_argument("--min-side", type=int, default=32, help="drop images whose short side is below this (px)")
    f.add_argument("--max-aspect", type=float, default=20.0, help="drop images with a longer aspect ratio")
    f.add_argument("--min-text-chars", type=int, default=2, help="drop lines with less text")
    f.add_argument("--max-text-chars", type=int, default=20_000, help="drop lines with more text")
    f.add_argument("--solid-std", type=float, default=2.0, help="drop images whose grey std is below this")
    f.add_argument("--no-dedup", action="store_true", help="keep exact and near duplicates")
    f.add_argument("--phash-distance", type=int, default=4, help="near duplicate: perceptual hashes within this "
                                                                 "many bits")
    f.add_argument("--scorer", help="relevance scorer module:function(image, text) -> float, e.g. a CLIP score")
    f.add_argument("--min-score", type=float, default=0.3, help="keep lines the scorer rates at least this")
    f.add_argument("--balance-t", type=int, help="concept-balanced resampling: at most about this many lines per "
                                                 "concept")
    f.add_argument("--concepts", help="concept vocabulary file, one word or phrase per line (default: content "
                                      "words)")
    f.add_argument("--recaption", help="recaption hook module:function(image, text) -> new caption")
    f.add_argument("--max-image-pixels", type=int, default=89_478_485, help="decompression-bomb limit (pixels)")
    f.add_argument("--rejects", help="write every dropped line with its reason to this JSONL")
    f.add_argument("--seed", type=int, default=0, help="seed of the concept resampling")
    args = f.parse_args(argv)
    concepts = None
    if args.concepts:
        with open(args.concepts, encoding="utf-8") as fh:
            concepts = fh.read().splitlines()
    summary = quality_filter(
        args.input, args.output, min_side=args.min_side, max_aspect=args.max_aspect,
        min_text_chars=args.min_text_chars, max_text_chars=args.max_text_chars, solid_std=args.solid_std,
        dedup=not args.no_dedup, phash_distance=args.phash_distance,
        scorer=data.import_callable(args.scorer) if args.scorer else None, min_score=args.min_score,
        balance_t=args.balance_t, concepts=concepts,
        recaption=data.import_callable(args.recaption) if args.recaption else None,
        max_image_pixels=args.max_image_pixels, rejects=args.rejects, seed=args.seed)
    print(f"read {summary['read']} lines, kept {summary['kept']}, dropped {summary['read'] - summary['kept']}")
    for reason, count in summary["dropped"].items():
        print(f"  {reason:<24}{count}")
    return summary


if __name__ == "__main__":
    main()
