"""The shared training loop: schedules, exact resumption, refusing to overwrite, clear errors."""

import json

import pytest
import torch

from sinkless.errors import SinklessError
from sinkless.training import CHECKPOINT, LOG, TrainSettings, learning_rate, train


def _problem(seed=0):
    torch.manual_seed(0)
    target = torch.nn.Linear(4, 1)  # the task: the same in every process
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 1))

    def step(t, generator):
        x = torch.randn(16, 4, generator=generator)  # all randomness of a step comes from its generator
        y = target(x).detach()
        loss = torch.nn.functional.mse_loss(model(x), y)
        return {"loss": loss, "mse": loss.detach()}

    return model, step


def _params(model):
    return dict(model.named_parameters())


def test_schedules():
    s = TrainSettings(steps=11, lr=1.0, final_lr=0.1, schedule="cosine", warmup=0)
    assert learning_rate(s, 0) == pytest.approx(1.0)
    assert learning_rate(s, 10) == pytest.approx(0.1)
    e = TrainSettings(steps=11, lr=1e-4, final_lr=5e-6, schedule="exponential")
    assert learning_rate(e, 10) == pytest.approx(5e-6)
    assert learning_rate(e, 5) == pytest.approx((1e-4 * 5e-6) ** 0.5)
    w = TrainSettings(steps=20, lr=1.0, warmup=4, schedule="constant")
    assert [learning_rate(w, t) for t in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])


def test_loss_goes_down_and_log_written(tmp_path):
    model, step = _problem()
    result = train(_params(model), step, TrainSettings(steps=60, lr=3e-2, log_every=10), tmp_path, meta={"model": "toy"}, progress=False)
    data = json.loads((tmp_path / LOG).read_text())
    assert data["model"] == "toy" and data["finished"] and data["steps_done"] == 60
    assert data["loss_curve"][-1]["loss"] < data["loss_curve"][0]["loss"]
    assert result.final_loss == data["loss_curve"][-1]["loss"]
    assert (tmp_path / CHECKPOINT).exists()


def test_interrupt_and_resume_give_the_same_weights(tmp_path):
    settings = TrainSettings(steps=30, lr=1e-2, checkpoint_every=7, log_every=5)
    model, step = _problem()
    straight = train(_params(model), step, settings, tmp_path / "straight", progress=False)

    model2, step2 = _problem()

    def interrupting(t, generator):
        if t == 17:
            raise KeyboardInterrupt
        return step2(t, generator)

    with pytest.raises(KeyboardInterrupt):
        train(_params(model2), interrupting, settings, tmp_path / "resumed", progress=False)
    model3, step3 = _problem(seed=123)  # a fresh process: different initial weights, restored from the checkpoint
    result = train(_params(model3), step3, settings, tmp_path / "resumed", resume=True, progress=False)
    assert result.resumed_from == [14]  # interrupted inside step 17: the checkpoint of step 14 stays
    for (name, a), b in zip(model.state_dict().items(), model3.state_dict().values()):
        assert torch.equal(a, b), f"{name}: max diff {(a - b).abs().max():.3g}"
    assert result.curve == straight.curve  # the same rows (an on_log evaluation sees the same steps), the same values


def test_existing_checkpoint_needs_resume_and_matching_settings(tmp_path):
    model, step = _problem()
    train(_params(model), step, TrainSettings(steps=3), tmp_path, progress=False)
    with pytest.raises(SinklessError, match="--resume"):
        train(_params(model), step, TrainSettings(steps=3), tmp_path, progress=False)
    with pytest.raises(SinklessError, match=r"other settings, data or model \(differs: lr\)"):
        train(_params(model), step, TrainSettings(steps=3, lr=1.0), tmp_path, resume=True, progress=False)
    with pytest.raises(SinklessError, match=r"\(differs: data\)"):
        train(_params(model), step, TrainSettings(steps=3), tmp_path, meta={"data": "other"}, resume=True, progress=False)
    (tmp_path / CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(SinklessError, match="cannot read") as caught:
        train(_params(model), step, TrainSettings(steps=3), tmp_path, resume=True, progress=False)
    assert "run the same command with --resume to train from step 0" in caught.value.fix
    (tmp_path / CHECKPOINT).unlink()  # the fix it gives
    assert train(_params(model), step, TrainSettings(steps=3), tmp_path, resume=True, progress=False).resumed_from == []


def test_a_changed_step_budget_resumes_with_its_warm_up(tmp_path):
    """The warm-up is a share of the steps: raising the budget changes it, and must not refuse the checkpoint."""
    model, step = _problem()
    train(_params(model), step, TrainSettings(steps=20, warmup=3, checkpoint_every=5), tmp_path, progress=False)
    result = train(_params(model), step, TrainSettings(steps=40, warmup=6, checkpoint_every=5), tmp_path, resume=True, progress=False)
    assert result.resumed_from == [20] and result.steps_done == 40


def test_an_interrupt_before_the_first_checkpoint_says_nothing_is_kept(tmp_path, caplog):
    model, step = _problem()

    def interrupting(t, generator):
        if t == 2:
            raise KeyboardInterrupt
        return step(t, generator)

    with pytest.raises(KeyboardInterrupt):
        train(_params(model), interrupting, TrainSettings(steps=30, checkpoint_every=10), tmp_path, progress=False)
    assert "before the first checkpoint: nothing is kept to resume" in caplog.text and not (tmp_path / CHECKPOINT).exists()


def test_bad_settings_and_diverging_loss(tmp_path):
    with pytest.raises(SinklessError):
        TrainSettings(steps=0)
    with pytest.raises(SinklessError):
        TrainSettings(lr=float("nan"))
    model, _ = _problem()
    with pytest.raises(SinklessError, match="loss became"):
        train(_params(model), lambda t, g: {"loss": torch.tensor(float("nan"), requires_grad=True)}, TrainSettings(steps=2), tmp_path, progress=False)


def test_lr_scale_moves_only_the_named_parameters_faster(tmp_path):
    model, step = _problem()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = TrainSettings(steps=1, lr=1e-3, schedule="constant", grad_clip=None, weight_decay=0.0)
    train(_params(model), step, settings, tmp_path / "a", lr_scale={"2.bias": 100.0}, progress=False)
    moved = {k: float((model.state_dict()[k] - before[k]).abs().max()) for k in before}
    # Adam's first step moves each weight by ~lr; the scaled bias by ~100 lr
    assert moved["2.bias"] == pytest.approx(0.1, rel=1e-3)
    assert moved["0.weight"] == pytest.approx(1e-3, rel=1e-3)
    with pytest.raises(ValueError, match="not trained"):
        train(_params(model), step, settings, tmp_path / "b", lr_scale={"nope": 2.0}, progress=False)


def test_a_checkpoint_without_an_extra_state_resumes_with_a_warning(tmp_path, caplog):
    """A job that starts checkpointing a new state (e.g. the DVT block's best-so-far) still resumes older checkpoints."""

    class Counter:
        def __init__(self):
            self.n = 7

        def state_dict(self):
            return {"n": self.n}

        def load_state_dict(self, state):
            self.n = state["n"]

    model, step = _problem()
    train(_params(model), step, TrainSettings(steps=4, lr=1e-2, checkpoint_every=2), tmp_path, progress=False)
    counter = Counter()
    with caplog.at_level("WARNING", logger="sinkless.training"):
        result = train(_params(model), step, TrainSettings(steps=6, lr=1e-2, checkpoint_every=2), tmp_path, progress=False,
                       resume=True, extra_state={"counter": counter})
    assert result.resumed_from == [4] and counter.n == 7
    assert "holds no 'counter' state" in caplog.text
    state = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    assert state["extra"] == {"counter": {"n": 7}}  # saved from now on
