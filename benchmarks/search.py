"""Image search speed and recall: polymodal's FAISS HNSW index against brute-force numpy
over the same embeddings, in one run.

Embeds the easy-VQA images (train + test, ~5,000) with a dual encoder, then measures:
images indexed per second (embedding + adding, the whole `index build` path, against
embedding + stacking into a numpy matrix); queries per second for the index against
`embeddings @ query` + argpartition; and the index's recall@k against that exact search.
To see scale beyond the dataset, `--synthetic N` adds N random unit vectors to both.

    python benchmarks/search.py [--model runs/clip-easyvqa/model] [--k 10] [--queries 2000] [--synthetic 200000]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from polymodal.build import load_any
from polymodal.contrastive.embed import embed_images, embed_texts
from polymodal.search import ImageIndex


def easy_vqa_images() -> list[str]:
    from polymodal.data.easy_vqa import easy_vqa_folder

    return [str(p) for split in ("train", "test") for p in sorted((easy_vqa_folder(split) / "images").glob("*.png"))]


def exact_top_k(matrix: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """[Q, k] row ids of the k largest inner products, best first (brute force)."""
    scores = queries @ matrix.T  # [Q, N]
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(scores, top, 1).argsort(1)[:, ::-1]
    return np.take_along_axis(top, order, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = "runs/clip-easyvqa/model" if os.path.isdir("runs/clip-easyvqa/model") else "recipes/clip-easyvqa.yaml"
    parser.add_argument("--model", default=default)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--synthetic", type=int, default=200000, help="random unit vectors added to both sides")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_any(args.model)
    paths = easy_vqa_images()

    start = time.perf_counter()
    embeddings, _, _ = embed_images(model, paths, desc="numpy side")
    matrix = embeddings.numpy().astype(np.float32)
    numpy_index_seconds = time.perf_counter() - start
    start = time.perf_counter()
    index = ImageIndex(model.text.dim, args.model, "benchmark")
    index.index.add(np.ascontiguousarray(embed_images(model, paths, desc="index side")[0].numpy()))
    index.paths = list(paths)
    index_seconds = time.perf_counter() - start

    rng = np.random.default_rng(0)
    if args.synthetic:  # the same random vectors on both sides
        noise = rng.standard_normal((args.synthetic, matrix.shape[1])).astype(np.float32)
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        start = time.perf_counter()
        matrix = np.concatenate([matrix, noise])
        numpy_add_seconds = time.perf_counter() - start
        start = time.perf_counter()
        index.index.add(noise)
        index_add_seconds = time.perf_counter() - start
    texts = [f"a {c} {s}" for c in ("red", "green", "blue", "yellow", "black", "gray", "teal", "brown")
             for s in ("circle", "rectangle", "triangle")]
    text_queries = embed_texts(model, texts).numpy()
    image_queries = matrix[rng.choice(len(paths), args.queries - len(texts), replace=False)]
    queries = np.ascontiguousarray(np.concatenate([text_queries, image_queries]), dtype=np.float32)

    start = time.perf_counter()
    exact = exact_top_k(matrix, queries, args.k)
    numpy_query_seconds = time.perf_counter() - start
    start = time.perf_counter()
    _, found = index.index.search(queries, args.k)
    index_query_seconds = time.perf_counter() - start
    recall = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(exact, found)])

    print(f"model {args.model}, {len(paths)} easy-VQA images + {args.synthetic} random vectors "
          f"(dim {matrix.shape[1]}), {len(queries)} queries ({len(texts)} text, rest image), k={args.k}, "
          f"{args.threads} threads")
    print(f"{'':<34} {'numpy (exact)':>14} {'faiss HNSW':>12} {'ratio':>7}")
    print(f"{'images indexed / s (embed + add)':<34} {len(paths) / numpy_index_seconds:>14.1f} "
          f"{len(paths) / index_seconds:>12.1f} {numpy_index_seconds / index_seconds:>6.2f}x")
    if args.synthetic:
        print(f"{'vectors added / s (no embedding)':<34} {args.synthetic / numpy_add_seconds:>14.0f} "
              f"{args.synthetic / index_add_seconds:>12.0f} {numpy_add_seconds / index_add_seconds:>6.3f}x")
    print(f"{'queries / s':<34} {len(queries) / numpy_query_seconds:>14.1f} "
          f"{len(queries) / index_query_seconds:>12.1f} {numpy_query_seconds / index_query_seconds:>6.2f}x")
    print(f"recall@{args.k} of the index against exact search: {recall:.4f}")


if __name__ == "__main__":
    main()
