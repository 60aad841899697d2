"""What a training run reports: TensorBoard scalars every step and a progress bar, on rank 0 only."""

import sys

from tqdm import tqdm


class Monitor:
    def __init__(self, log_dir, enabled: bool, total_steps: int, initial_step: int):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter  # tensorboard is heavy: import only on rank 0

        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step",
                        file=sys.stderr, dynamic_ncols=True, disable=None)

    def scalars(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def step_done(self, loss: float, images_per_sec: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{images_per_sec:,.0f}", refresh=False)

    def captions(self, step: int, images, captions: list[str]) -> None:
        """A few validation images with their generated captions, for eyeballing progress."""
        if not self.enabled:
            return
        for i, (image, caption) in enumerate(zip(images, captions)):
            self.writer.add_image(f"val/image_{i}", image, step)
            self.writer.add_text(f"val/caption_{i}", caption, step)

    def write(self, message: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(message, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
