"""Which records each rank reads in which order, as pure functions of (seed, epoch, rank, world size).

Recomputing the order instead of keeping loader state is what makes resuming mid-epoch exact: a resumed run
plans the same epoch and drops the batches it already trained on.
"""

from dataclasses import dataclass

import numpy as np

ORDERS = ("random", "quasi_random", "sequential")


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world_size: int = 1


def records_per_rank(num_records: int, batch_size: int, shard: Shard, train: bool) -> int:
    """What one epoch of a loader gives this rank: full batches when training, its share of every record else."""
    if train:
        return train_batches_per_rank(num_records, batch_size, shard) * batch_size
    return len(eval_indices(num_records, shard))


def rank_order(num_records: int, batch_size: int, shard: Shard, *, train: bool, order: str, seed: int,
               epoch: int, quasi=None) -> np.ndarray:
    """Record indices this rank reads in `epoch`, in order (a pure function of its arguments). Evaluation reads
    file order; training the epoch's `order` (quasi_random needs `quasi`, an ffcv QuasiRandom)."""
    if not train:
        return eval_indices(num_records, shard)
    if order == "quasi_random":
        epoch_order = quasi_random_epoch_order(quasi, seed, epoch, batch_size)
    elif order == "random":
        epoch_order = random_epoch_order(num_records, seed, epoch)
    else:
        epoch_order = sequential_epoch_order(num_records)
    return train_order(epoch_order, batch_size, shard)


def train_batches_per_rank(num_records: int, batch_size: int, shard: Shard) -> int:
    """Every rank gets the same number of full batches; the remainder of the epoch's order is dropped."""
    return num_records // shard.world_size // batch_size


def train_order(epoch_order: np.ndarray, batch_size: int, shard: Shard) -> np.ndarray:
    """This rank's records: its slice of every global batch (world_size x batch_size records of the order).

    Global batch i is then the same records whatever the world size, so N ranks x B/N images train exactly
    like 1 rank x B images.
    """
    global_batch = batch_size * shard.world_size
    batches = len(epoch_order) // global_batch
    grid = epoch_order[:batches * global_batch].reshape(batches, shard.world_size, batch_size)
    return np.ascontiguousarray(grid[:, shard.rank, :]).reshape(-1)


def eval_indices(num_records: int, shard: Shard) -> np.ndarray:
    """Every record exactly once over all ranks, in file order; shard sizes differ by at most one."""
    return np.array_split(np.arange(num_records, dtype=np.int64), shard.world_size)[shard.rank]


def random_epoch_order(num_records: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_records).astype(np.int64)


def quasi_random_epoch_order(quasi, seed: int, epoch: int, batch_size: int) -> np.ndarray:
    """ffcv's QUASI_RANDOM order (page-local shuffling) of the whole split, from `quasi`, an ffcv QuasiRandom.

    QuasiRandom.sample_order shuffles its page table in place, so asking twice for one epoch gives two orders;
    this works on a copy, keeping the order a function of (seed, epoch) as resuming needs.
    """
    from ffcv.traversal_order.quasi_random import generate_order_inner

    order = np.zeros(int(quasi.page_sizes.sum()), dtype=np.int64)
    generate_order_inner(seed * 912300 + epoch, quasi.page_to_samples_array.copy(), quasi.page_sizes, order,
                         2 * batch_size)
    return order


def sequential_epoch_order(num_records: int) -> np.ndarray:
    return np.arange(num_records, dtype=np.int64)


def batch_seed(seed: int, epoch: int, batch: int) -> int:
    """Seed of one global batch's augmentation: independent of what ran before (a resumed epoch crops the
    same) and of the world size (each rank takes its rows of the global batch's draws)."""
    state = np.random.SeedSequence([seed, epoch, batch]).generate_state(1, np.uint64)[0]
    return int(state) & (2**63 - 1)
