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
