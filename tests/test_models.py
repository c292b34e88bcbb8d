import os

import pytest
import torch

from kdfast import train

from kdfast.models import count_parameters, create_model, list_models, model_entry


def test_lab_models_are_registered_with_their_families():
    assert {"resnet18", "resnet8", "vit_tiny", "vit_student"} <= set(list_models())
    assert model_entry("resnet8").family == "cnn" and model_entry("vit_tiny").family == "vit"


@pytest.mark.parametrize("name,params", [("resnet8", 78_042), ("resnet18", 11_173_962),
                                         ("vit_tiny", 5_362_762), ("vit_student", 2_693_578)])
def test_shapes_and_sizes(name, params):
    model = create_model(name)
    assert count_parameters(model) == params
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_architecture_details():
    r18 = create_model("resnet18")
    assert r18.conv1.kernel_size == (3, 3) and r18.conv1.stride == (1, 1)
    assert isinstance(r18.maxpool, torch.nn.Identity)
    r8 = create_model("resnet8")
    assert [len(s) for s in (r8.layer1, r8.layer2, r8.layer3)] == [1, 1, 1]
    assert [s[0].conv1.out_channels for s in (r8.layer1, r8.layer2, r8.layer3)] == [16, 32, 64]
    vit, student = create_model("vit_tiny"), create_model("vit_student")
    assert (len(vit.blocks), vit.embed_dim, vit.blocks[0].attn.num_heads) == (12, 192, 3)
    assert len(student.blocks) == 6 and student.patch_embed.patch_size == (4, 4)


def test_none_kwargs_keep_model_defaults():
    assert create_model("resnet8", num_classes=None).fc.out_features == 10
    assert create_model("resnet8", num_classes=3).fc.out_features == 3


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ValueError, match="Did you mean resnet8"):
        create_model("resnet_8")


def test_pretrained_weights_neither_cached_nor_downloadable_say_so(tmp_path, monkeypatch):
    """Offline: torchvision's URL refused (a closed port on 127.0.0.1), the hub in offline mode, empty caches."""
    import socket

    import huggingface_hub.constants as hc
    from torchvision.models import ResNet18_Weights

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(ResNet18_Weights.IMAGENET1K_V1.value, "url", f"http://127.0.0.1:{port}/resnet18-f37072fd.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ValueError, match="--pretrained: could not get the weights of torchvision:resnet18"):
        create_model("resnet18", pretrained=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="could not get the weights of timm:vit_tiny_patch16_224.augreg.*without --pretrained"):
        create_model("vit_tiny", pretrained=True)


@pytest.mark.parametrize("model,flags,said", [
    ("timm:vit_tiny_patch16_224", [], "timm:vit_tiny_patch16_224@224 resizes the views"),
    ("vit_student", ["--augment.crop-size", "28"], "cannot take the training views (28x28 px)"),
    ("torchvision:fcn_resnet50", [], "not a classifier kdfast can train"),
    ("resnet8", ["--augment.crop-size", "64"], "reaches beyond one reflection of the 32 px images"),
    ("resnet8", ["--augment.padding", "40"], "--augment.padding 40"),
])
def test_a_model_or_view_that_cannot_take_the_images_is_refused_before_training(small_cache, tmp_path, capsys,
                                                                                 model, flags, said):
    from .test_runs import one_line_error

    data = os.path.join(os.path.dirname(small_cache["h5"]), "tiny")
    err = one_line_error(capsys, train.main, ["--model", model, "--data", data, "--cache-dir", small_cache["cache_dir"],
                                              "--epochs", "1", "--batch-size", "6", "--precision", "fp32",
                                              "--no-progress", "--out-dir", str(tmp_path), *flags])
    assert said in err, err
    assert not any(name.endswith(".json") for name in os.listdir(tmp_path))


# the KD tables' zoo at 100 classes: the parameter count of RepDistiller's model code (the code behind the CRD and
# DKD tables, counted with it), and that count in millions rounded to two decimals (as the README lists it)
ZOO = {"resnet8": (83_892, 0.08), "resnet20": (278_324, 0.28), "resnet32": (472_756, 0.47),
       "resnet44": (667_188, 0.67), "resnet56": (861_620, 0.86), "resnet110": (1_736_564, 1.74),
       "resnet8x4": (1_233_540, 1.23), "resnet32x4": (7_433_860, 7.43), "wrn_16_1": (180_916, 0.18),
       "wrn_16_2": (703_284, 0.70), "wrn_40_1": (569_780, 0.57), "wrn_40_2": (2_255_156, 2.26),
       "vgg8": (3_965_028, 3.97), "vgg11": (9_277_284, 9.28), "vgg13": (9_462_180, 9.46),
       "mobilenetv2": (812_836, 0.81), "shufflenetv1": (949_258, 0.95), "shufflenetv2": (1_355_528, 1.36)}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_models_have_the_tables_parameter_counts_train_a_step_and_reload(name, tmp_path):
    from kdfast.checkpoint import load_checkpoint, save_checkpoint

    exact, millions = ZOO[name]
    torch.manual_seed(0)
    model = create_model(name, num_classes=100)
    assert count_parameters(model) == exact and round(exact / 1e6, 2) == millions
    assert model_entry(name).family == "cnn" and model_entry(name).light == (name in ("mobilenetv2", "shufflenetv1",
                                                                                       "shufflenetv2"))
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 99]))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    model.eval()
    save_checkpoint(str(tmp_path), name, model, {"model": name, "classes": [str(c) for c in range(100)]})
    again, _ = load_checkpoint(str(tmp_path / f"{name}.pth"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), again.eval()(x))


def test_the_lab_resnet8_is_not_the_tables_resnet8x4():
    lab, x4 = create_model("resnet8"), create_model("resnet8x4")
    assert lab.conv1.out_channels == 16 and x4.conv1.out_channels == 32 and x4.fc.in_features == 256
