"""`audio-image`: emergent audio->image retrieval (ImageBind's headline result).

The audio tower (MODEL, e.g. recipes/bind-audio.yaml) and the image tower (`--image-model`,
e.g. recipes/clip-easyvqa.yaml) were each trained against the same frozen text tower and
never on audio-image pairs. The dataset's spoken captions (`task_dataset`; easy-VQA's test
captions in voices unheard in training) query its images; an image is relevant when its
caption is the spoken one.
Also reported: audio->text accuracy against the captions (what the binding learned) and
text->image recall with the same captions as text (the ceiling the image tower sets).
"""

from __future__ import annotations

from pathlib import Path

import torch

from polymodal.contrastive.embed import embed_images, embed_texts, require_dual_encoder
from polymodal.errors import UserError
from polymodal.eval.retrieval import recall_at
from polymodal.eval.tasks import Task, TaskOptions, register_task, seeded_sample, task_dataset


@register_task("audio-image")
class AudioImage(Task):
    """Emergent audio->image retrieval through a shared text space (dual encoders)."""

    generative = False
    headline = "audio_to_image_R@5"

    def run(self, model, options: TaskOptions, batch_size: int, items=None) -> tuple[dict, list[dict]]:
        from polymodal.build import load_any

        require_dual_encoder(model, "task audio-image")
        if model.encoder.modality != "audio":
            raise UserError("task audio-image: MODEL must be an audio dual encoder (recipes/bind-audio.yaml)")
        if not options.image_model:
            raise UserError("task audio-image needs --image-model (an image dual encoder in the same text space)")
        image_model = load_any(options.image_model)
        require_dual_encoder(image_model, "--image-model")
        clips, gallery = task_dataset(options).spoken_captions()
        clips = seeded_sample(clips, options.limit, options.seed)
        spoken = [clip.messages[-1]["content"] for clip in clips]
        audio, _, _ = embed_images(model, [clip.images[0] for clip in clips], batch_size, desc="audio")  # [Q, D]
        images, _, _ = embed_images(image_model, [image for image, _ in gallery], batch_size)  # [N, D]
        relevant = torch.tensor([[caption == said for _, caption in gallery] for said in spoken])  # [Q, N]
        audio_to_image = recall_at(audio @ images.T, relevant)
        captions = sorted(set(spoken))
        texts = embed_texts(model, captions)  # [C, D]: the text tower both were bound to
        heard = (audio @ texts.T).argmax(1).tolist()
        text_to_image = recall_at(embed_texts(image_model, spoken) @ images.T, relevant)
        best = (audio @ images.T).argmax(1).tolist()
        rows = [{"id": clip.id, "prompt": f"(spoken) {said}", "prediction": gallery[top][1], "reference": said,
                 "correct": gallery[top][1] == said, "heard_as": captions[guess]}
                for clip, said, top, guess in zip(clips, spoken, best, heard)]
        results = {"audio_to_image_R@5": audio_to_image["R@5"], "audio_to_image": audio_to_image,
                   "audio_to_text_accuracy": sum(captions[g] == s for g, s in zip(heard, spoken)) / len(spoken),
                   "text_to_image": text_to_image, "clips": len(clips), "images": len(gallery),
                   "image_model": str(Path(options.image_model))}
        return results, rows
