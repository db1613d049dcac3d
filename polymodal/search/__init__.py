"""Image search: a persistent FAISS index of a dual encoder's image embeddings.

Example:
    model = load_any("runs/clip-easyvqa/model")
    index, skipped = ImageIndex.build(model, "runs/clip-easyvqa/model", "photos/")
    index.save("photos.index")
    for hit in ImageIndex.load("photos.index").search(model, text="a red circle", k=5):
        print(hit.score, hit.path)
"""

from polymodal.search.index import Hit, ImageIndex, model_fingerprint

__all__ = ["Hit", "ImageIndex", "model_fingerprint"]
