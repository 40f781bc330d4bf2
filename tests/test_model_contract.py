"""The model contract the engine relies on: presets, recipes, the fit_memory hook, and ops.trace()."""

import pytest
import torch
from torch import nn

import fastuad
from fastuad.data.demo import make_demo_dataset
from fastuad.engine import TrainConfig, load_checkpoint, train
from fastuad.errors import FastUADError
from fastuad.models import ModelError, TrainRecipe, create_model, list_presets, register_model
from fastuad.models.recipe import RecipeError, build_optimizer, build_scheduler
from fastuad.ops import cosine_distance, cosine_distance_map, trace


class _MemoryOnly(nn.Module):
    """A model with no trainable parameters: it only counts what fit_memory shows it."""

    def __init__(self, image_size: int, config: dict) -> None:
        super().__init__()
        self.register_buffer("seen", torch.zeros(()))
        self.register_buffer("epochs_seen", torch.zeros(()))
        self.image_size, self.config = image_size, config
        self.recipe = TrainRecipe(epochs=2, batch_size=3)

    def fit_memory(self, loader, epoch: int, progress: bool) -> None:
        assert not self.training and not torch.is_grad_enabled()
        self.seen += sum(b["image"].shape[0] for b in loader)
        self.epochs_seen += 1

    def forward(self, images):
        amap = torch.zeros(images.shape[0], 1, self.image_size, self.image_size) + self.seen
        return amap, amap.flatten(1).amax(1)


@register_model(name="_contract_memory_only", presets=("default", "paper"))
def _memory_only(backbone: str = "none", image_size: int = 64, weights=None, preset: str = "default"):
    return _MemoryOnly(image_size, {"name": "_contract_memory_only", "backbone": backbone, "image_size": image_size, "preset": preset})


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract") / "data"
    return make_demo_dataset(root, image_size=64, n_train=4, n_test_good=2, n_test_per_defect=1, classes=("brick", "coffee"))


def test_fit_memory_runs_before_every_epoch_and_is_checkpointed(tiny_root, tmp_path):
    cfg = TrainConfig(model="_contract_memory_only", dataset="mvtec", data_root=str(tiny_root), out=str(tmp_path / "run"), progress=False)
    result = train(cfg)
    assert result["epochs_run"] == 2 and result["recipe"]["batch_size"] == 3  # the model's recipe
    model, ckpt = load_checkpoint(result["checkpoint"])
    assert ckpt["optimizer"] is None  # nothing to optimise: no gradient loop
    assert model.epochs_seen.item() == 2 and model.seen.item() == 2 * 8  # 2 classes x 4 train images, twice
    assert ckpt["config"]["preset"] == "default"


def test_presets_are_validated_and_recorded():
    assert list_presets("rd4ad") == ("default",)
    with pytest.raises(ModelError, match="allowed presets: default, paper"):
        create_model("_contract_memory_only", preset="tiny")
    with pytest.raises(ModelError, match="allowed presets: default$"):
        create_model("rd4ad", preset="paper")
    assert create_model("_contract_memory_only", preset="paper").config["preset"] == "paper"
    assert issubclass(ModelError, FastUADError) and issubclass(ModelError, ValueError)


def test_recipe_checks_and_schedules():
    with pytest.raises(RecipeError, match="optimizer"):
        TrainRecipe(optimizer="lamb")
    with pytest.raises(RecipeError, match="schedule"):
        TrainRecipe(schedule="linear")
    p = nn.Parameter(torch.zeros(1))
    recipe = TrainRecipe(optimizer="adamw", lr=1.0, epochs=2, schedule="cosine", warmup_steps=2)
    opt = build_optimizer([p], recipe)
    sched = build_scheduler(opt, recipe, steps_per_epoch=5)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)  # linear warm-up
    assert lrs[2] > lrs[5] > lrs[9] > 0  # cosine decay
    step = TrainRecipe(lr=1.0, epochs=3, schedule="step", milestones=(2,), gamma=0.1)
    opt = build_optimizer([p], step)
    sched = build_scheduler(opt, step, steps_per_epoch=2)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([1, 1, 1, 1, 0.1, 0.1])
    assert TrainRecipe().replace(lr=None, epochs=3).epochs == 3


def test_trace_records_every_op_call_in_order():
    a, b = torch.randn(2, 8, 5, 5), torch.randn(2, 8, 5, 5)
    with trace() as calls:
        cosine_distance(a, b)
        with trace() as inner:
            cosine_distance_map([a], [b], backend="torch")
    assert [c.op for c in calls] == ["cosine_distance", "cosine_distance_map"]
    assert [c.op for c in inner] == ["cosine_distance_map"]
    assert calls[0].backend == "torch" and calls[0].shapes == ((2, 8, 5, 5), (2, 8, 5, 5))
    assert calls[0].dtypes == ("float32", "float32")
    assert "cosine_distance[torch](float32[2, 8, 5, 5]" in str(calls[0])
    cosine_distance(a, b)
    assert len(calls) == 2  # nothing recorded outside the block
    assert fastuad.ops.trace is trace


def test_rd4ad_runs_through_the_fused_ops():
    model = create_model("rd4ad", image_size=64, weights="random").eval()
    with trace() as calls:
        model(torch.randn(1, 3, 64, 64))
    assert [c.op for c in calls] == ["cosine_distance_map"]
