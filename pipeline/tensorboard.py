"""TensorBoard event files under a run URL: written locally, uploaded when the run is remote."""

from __future__ import annotations

import os
import tempfile

import torch
from torch.utils.tensorboard import SummaryWriter

from pipeline import storage


class TensorBoard:
    """A SummaryWriter whose log folder is ``url``, local or remote (synced by ``sync``)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        if storage.is_local(url):
            self.logdir = storage.local_path(url)
            self._remote = False
        else:
            self.logdir = tempfile.mkdtemp(prefix="cut-tb-")
            self._remote = True
        os.makedirs(self.logdir, exist_ok=True)
        self.writer = SummaryWriter(self.logdir)
        self._uploaded: dict[str, int] = {}

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def images(self, step: int, images: dict[str, torch.Tensor]) -> None:
        """Add images in [-1, 1] under their tags: (C, H, W), or (N, C, H, W) shown side by side; C is
        1 (grey), 3 (RGB) or 4 (RGBA); of others, the first channel (grey + alpha: the grey) or,
        beyond 4, the first three."""
        for tag, img in images.items():
            img = img.detach().float().cpu().clamp(-1, 1)
            if img.shape[-3] not in (1, 3, 4):
                img = img[..., :1 if img.shape[-3] == 2 else 3, :, :]
            if img.dim() == 4:
                img = torch.cat(list(img), dim=2)
            self.writer.add_image(tag, (img + 1) / 2, step)

    def text(self, tag: str, markdown: str, step: int = 0) -> None:
        self.writer.add_text(tag, markdown, step)

    def hparams(self, params: dict[str, float | int | str | bool], metrics: dict[str, float]) -> None:
        """The run's hyperparameters beside its final metrics (TensorBoard's HPARAMS tab)."""
        self.writer.add_hparams(params, {f"hparam/{k}": v for k, v in metrics.items()}, run_name="hparams")

    def sync(self) -> None:
        """Flush, and upload the event files that grew since the last sync (remote runs)."""
        self.writer.flush()
        if not self._remote:
            return
        for name in sorted(os.listdir(self.logdir)):
            path = os.path.join(self.logdir, name)
            size = os.path.getsize(path)
            if self._uploaded.get(name) != size:
                storage.upload_atomic(path, storage.join(self.url, name))
                self._uploaded[name] = size

    def close(self) -> None:
        self.sync()
        self.writer.close()
