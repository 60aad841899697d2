"""Where a training run stands: the "train" part of every checkpoint, and what `--resume` starts from.

A checkpoint holds four parts, each saved and restored through its own state_dict (Trainer.checkpoint_parts is the
one list of them): "model" (capfast/models/record.py), "train" (TrainState, here), "optimizer" and "scaler". The
validations (best CIDEr, eval.patience) are in the run directory's validations.json, since a validation comes
after its step's save (capfast/models/run_dir.py).
"""

from dataclasses import dataclass, field, fields

from capfast.errors import CapfastError


@dataclass
class TrainState:
    step: int = 0            # optimizer steps done
    epoch: int = 0           # the epoch in progress; `epochs` once the last one is done
    batch_in_epoch: int = 0  # its (micro-)batches consumed, a multiple of optim.grad_accum; 0 at an epoch's start
    world_size: int = 1      # processes that trained up to here
    data: dict = field(default_factory=dict)     # the training data's fingerprint (store.beton.data_fingerprint)
    config: dict = field(default_factory=dict)   # the train config in use (train.config.to_dict)
    config_history: list = field(default_factory=list)  # each resume's changes: [{"step", "changes"}]
    rng: list = field(default_factory=list)      # every rank's random generators at the save (train/rng.py)

    def state_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def load_state_dict(self, values: dict) -> None:
        for f in fields(self):
            setattr(self, f.name, values[f.name])

    @classmethod
    def from_state_dict(cls, values: dict, source) -> "TrainState":
        names = {f.name for f in fields(cls)}
        if not isinstance(values, dict) or set(values) != names:
            raise CapfastError(f"{source} holds no training state this capfast can resume from (written by another "
                               f"version?): start a new run with init_from={source} instead")
        state = cls()
        state.load_state_dict(values)
        return state

    def advance(self, batches: int, batches_per_epoch: int) -> None:
        """One optimizer step over `batches` more batches; at the epoch's last one, the next epoch's start."""
        self.step += 1
        self.batch_in_epoch += batches
        if self.batch_in_epoch >= batches_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    @property
    def mid_epoch(self) -> bool:
        return self.batch_in_epoch > 0
