"""The training driver (jaxconcept/loop.py): its schedule of stops, and the optional TensorBoard
writer beside metrics.jsonl."""
import struct

import pytest

from jaxconcept import config as C, rundir
from jaxconcept.train import loop

VEC = ["train.steps=12", "train.steps_per_call=4", "train.checkpoint_every=8", "eval.steps=[4,12]",
       "data.n_per_class=16"]  # as tests/test_sweep.py: the same compiled programs


def test_schedule_stops_at_evaluations_checkpoints_and_the_end():
    s = loop.schedule([0, 4, 12], total=12, checkpoint_every=8)
    assert s.eval_first and s.stops == (4, 8, 12)
    assert s.evals == {4, 12} and s.checkpoints == {8, 12}
    s = loop.schedule([3, 10], total=10, checkpoint_every=4)
    assert not s.eval_first and s.stops == (3, 4, 8, 10) and s.evals == {3, 10} and s.checkpoints == {4, 8, 10}


def test_a_resumed_schedule_is_the_rest_of_the_uninterrupted_one():
    full = loop.schedule([0, 5, 9, 20], total=20, checkpoint_every=6)
    for start in sorted(full.checkpoints):
        rest = loop.schedule([0, 5, 9, 20], total=20, checkpoint_every=6, start=start)
        assert not rest.eval_first  # step 0 was evaluated by the first run
        assert rest.stops == tuple(s for s in full.stops if s > start)
        assert rest.evals == {s for s in full.evals if s > start}
        assert rest.checkpoints == {s for s in full.checkpoints if s > start}


def test_stop_after_cuts_the_schedule_and_checkpoints_there():
    s = loop.schedule([4, 12], total=12, checkpoint_every=8, stop_after=6)
    assert s.stops == (4, 6) and s.evals == {4} and s.checkpoints == {6}
    assert loop.schedule([4, 12], total=12, checkpoint_every=8, start=8, stop_after=8).stops == ()


def _events(path):
    """(tag, step, value) of every scalar in a TFRecord file of tensorboard Event protos."""
    from tensorboardX.proto import event_pb2

    out, blob, i = [], path.read_bytes(), 0
    while i < len(blob):
        (n,) = struct.unpack("<Q", blob[i:i + 8])
        event = event_pb2.Event.FromString(blob[i + 12:i + 12 + n])  # after length and its crc
        out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
        i += 12 + n + 4  # the data's crc
    return out


def test_tensorboard_gets_the_scalars_of_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboardX")
    cfg = C.override(C.preset("vec_tiny"), VEC + ["train.tensorboard=true"])
    loop.train(cfg, tmp_path, progress=False)
    files = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1
    got = {(tag, step): v for tag, step, v in _events(files[0])}
    records = rundir.load_metrics(tmp_path)
    assert [r["step"] for r in records] == [4, 8, 12]
    for r in records:
        for name in ("train_loss", "val_loss", "test_loss"):
            for i, v in enumerate(r.get(name, ())):
                assert got[(f"{name}/member_{i}", r["step"])] == pytest.approx(v, rel=1e-6)
    assert {tag for tag, _ in got} == {"train_loss/member_0", "val_loss/member_0", "test_loss/member_0", "steps_per_s"}
    assert not C.preset("vec_tiny").train.tensorboard  # off by default
