"""capfast.data under torch.distributed: two gloo processes on the CPU, each writing what its loaders yielded."""

import json
import time

import pytest
import torch.multiprocessing as mp

from capfast.store.beton import BetonContents

# numba prints a harmless KeyError when ffcv's compiled pipelines are garbage-collected
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
WORLD = 2
TIMEOUT_S = 240


def rank_main(rank: int, train_beton: str, val_beton: str, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from capfast.common.normalization import IMAGENET
    from capfast.data import LoaderOptions, build_loader
    from capfast.errors import CapfastError

    def loader(beton, train: bool, **options):
        options = LoaderOptions(image_size=16, workers=1, **options)
        return build_loader(beton, options, train=train, distributed=True, normalization=IMAGENET)

    def image_ids(batches):
        return [i for batch in batches for i in batch.image_ids.tolist()]

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        train = loader(train_beton, batch_size=WORLD * 3, train=True)  # batch sizes are over all processes
        epochs = [list(train.epoch(e)) for e in (0, 1)]
        quasi = loader(train_beton, batch_size=WORLD * 3, train=True, order="quasi_random", os_cache=False)
        quasi = list(quasi.epoch(0))
        val = list(loader(val_beton, batch_size=9, train=False).epoch(0))  # 5 per rank: ceil(9 / 2)
        try:
            loader(train_beton, batch_size=5, train=True)
            uneven = None
        except CapfastError as e:
            uneven = str(e)
        result = {"len": len(train), "batches": [len(e) for e in epochs], "train": [image_ids(e) for e in epochs],
                  "quasi": image_ids(quasi), "eval": image_ids(val),
                  "eval_batch_sizes": [len(b.image_ids) for b in val], "uneven": uneven}
    finally:
        dist.destroy_process_group()
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(result, f)


def run_ranks(tmp_path, train_beton, val_beton) -> list[dict]:
    context = mp.start_processes(rank_main, args=(str(train_beton), str(val_beton), str(tmp_path / "init"),
                                                  str(tmp_path)), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            raise TimeoutError("distributed loader ranks did not finish")
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD)]


def test_two_ranks_get_disjoint_equal_shards_and_eval_sees_every_image_once(tmp_path, converted):
    train_beton, val_beton = converted / "train.beton", converted / "val.beton"
    ranks = run_ranks(tmp_path, train_beton, val_beton)
    all_train = set(BetonContents(train_beton).image_ids.tolist())
    per_rank = 32 // WORLD // 3 * 3  # 5 full batches of 3 per rank; 2 of the 32 records dropped each epoch

    epochs = [[r["train"][e] for r in ranks] for e in (0, 1)] + [[r["quasi"] for r in ranks]]
    for shards in epochs:
        assert all(len(shard) == len(set(shard)) == per_rank and set(shard) <= all_train for shard in shards)
        assert not set(shards[0]) & set(shards[1])  # disjoint across ranks
    assert all(r["len"] == per_rank // 3 and r["batches"] == [per_rank // 3] * 2 for r in ranks)
    assert ranks[0]["train"][0] != ranks[0]["train"][1]  # a new order every epoch

    val_ids = BetonContents(val_beton).image_ids.tolist()
    assert ranks[0]["eval"] + ranks[1]["eval"] == val_ids  # each image once, contiguous shards in file order
    assert [r["eval_batch_sizes"] for r in ranks] == [[5, 1], [5, 1]]
    assert [r["uneven"] for r in ranks] == ["data.batch_size=5 does not split evenly over 2 processes"] * WORLD
