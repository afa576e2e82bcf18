"""The training recipe's speed options run on the CPU on a tiny batch: bf16 autocast
(``trainer.precision``), channels-last memory (``model.channels_last``), ``torch.compile``
(``model.compile``), and the loader options (``data.cache_dir``, ``data.pin_memory``,
``data.persistent_workers``) through the real CLI."""
import pytest
import torch

from data.dataset import RadiographDataset, collate_skipping_failures
from data.manifest import load_manifest
from data.phantom2d import generate_dataset
from training.system import FractureSystem
from training_config import compose_config

IMAGE_SIZE = (64, 48)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    out = tmp_path_factory.mktemp("options")
    generate_dataset(out, n=6, seed=51, size=128, workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def batch(phantom):
    ds = RadiographDataset(load_manifest(phantom / "manifest.csv"), image_size=IMAGE_SIZE, augment=True, max_crops=3)
    torch.manual_seed(0)
    return collate_skipping_failures([ds[i] for i in range(2)])


def test_channels_last_keeps_the_losses_and_trains_under_bf16_autocast(batch):
    torch.manual_seed(0)
    plain = FractureSystem(fpn_dim=16, image_size=IMAGE_SIZE).eval()
    torch.manual_seed(0)
    last = FractureSystem(fpn_dim=16, image_size=IMAGE_SIZE, channels_last=True).eval()
    for net in (last.net, last.vertebra_net):
        conv = next(p for p in net.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] > 1)
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    with torch.no_grad():
        a, b = plain.batch_losses(batch), last.batch_losses(batch)
    assert set(a) == set(b)
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-5), key
    last.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = last.batch_losses(batch)["loss"]
    loss.backward()
    assert torch.isfinite(loss) and last.net.encoder.conv1.weight.grad is not None
    assert last.vertebra_net.encoder.conv1.weight.grad is not None  # the crops went through too
    # the state dict is the plain one: a channels-last run's checkpoint loads anywhere
    assert list(last.state_dict()) == list(plain.state_dict())


def test_compile_compiles_both_networks_in_place(batch):
    """model.compile names a torch.compile backend (true: inductor); "eager" traces the networks
    with dynamo without generating code, which is what a CPU test can afford."""
    torch.manual_seed(0)
    system = FractureSystem(fpn_dim=16, image_size=IMAGE_SIZE, compile="eager").eval()
    keys = list(system.state_dict())
    with torch.no_grad():
        before = system.batch_losses(batch)
    system.configure_model()
    system.configure_model()  # a second fit does not compile twice
    assert system.compiled and system.net._compiled_call_impl is not None
    assert system.vertebra_net._compiled_call_impl is not None
    with torch.no_grad():
        after = system.batch_losses(batch)
    for key in before:
        assert torch.allclose(before[key], after[key], rtol=1e-5, atol=1e-6), key
    assert list(system.state_dict()) == keys


@pytest.mark.slow
def test_compile_with_inductor(batch):
    """The GPU recipe's setting (inductor); minutes on two CPU cores."""
    torch.manual_seed(0)
    system = FractureSystem(fpn_dim=16, image_size=IMAGE_SIZE, compile=True)
    system.configure_model()
    loss = system.batch_losses(batch)["loss"]
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.slow
def test_the_cli_trains_with_bf16_channels_last_and_the_loader_options(phantom, tmp_path):
    """A whole (one-step) fit through the CLI; about a minute on two CPU cores, so marked slow:
    the configs' parsing, these options included, is tested in tests/test_configs.py."""
    import train

    cfg = compose_config(tmp_path / "run", phantom / "manifest.csv",
                         trainer={"precision": "bf16-mixed", "limit_train_batches": 1, "limit_val_batches": 1,
                                  "num_sanity_val_steps": 0},
                         model={"fpn_dim": 16, "channels_last": True},
                         data={"image_size": list(IMAGE_SIZE), "batch_size": 2, "num_workers": 1,
                               "cache_dir": str(tmp_path / "cache"), "pin_memory": True,
                               "persistent_workers": False})
    cli = train.main(["fit", "--config", str(cfg)])
    assert cli.trainer.global_step >= 1 and cli.trainer.precision == "bf16-mixed"
    assert cli.model.hparams.channels_last and cli.datamodule.train_set.cache is not None
    assert (tmp_path / "run" / "last.ckpt").is_file()
