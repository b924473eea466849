"""chiplock.registry: one registry for transforms, fingerprint sources and soft-lock formats, and the option
specs the CLI builds its options from."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from chiplock.errors import UnsupportedConfig
from chiplock.registry import Option, Registry, choices_enum, merge_options, options_from_dataclass, with_options


def test_register_get_names_and_the_unknown_name_message():
    reg: Registry = Registry("colour")

    @reg.register("red")
    class Red:
        pass

    reg.register("blue", object())
    assert reg.get("red") is Red and reg.names() == ["blue", "red"] and [n for n, _ in reg.items()] == reg.names()
    assert "red" in reg and len(reg) == 2 and reg.find("green") is None
    with pytest.raises(UnsupportedConfig, match=r"^unknown colour 'green'; choose one of blue, red$"):
        reg.get("green")
    with pytest.raises(UnsupportedConfig, match="unknown colour"):
        reg.get(["unhashable"])


def test_a_taken_name_is_refused_but_the_same_class_may_register_again():
    reg: Registry = Registry("thing")

    class A:
        pass

    class B:
        pass

    reg.register("a", A)
    reg.register("a", A)  # re-importing a plug-in module is harmless
    with pytest.raises(ValueError, match="'a' is already registered"):
        reg.register("a", B)
    with pytest.raises(ValueError, match="non-empty"):
        reg.register("", B)
    reg.unregister("a")
    assert reg.names() == []


def test_built_in_registries_keep_their_messages():
    from chiplock.fingerprint import available_sources, get_source
    from chiplock.transforms import available_transforms, get_transform

    assert {"aes", "pre-aes", "shuffle"} <= set(available_transforms())
    with pytest.raises(UnsupportedConfig, match="^unknown transform 'x'; choose one of aes, "):
        get_transform("x")
    assert {"clock", "precision", "sram", "tpm"} <= set(available_sources())
    with pytest.raises(UnsupportedConfig, match="^unknown fingerprint source 'x'; choose one of clock, "):
        get_source("x")


def test_sources_declare_their_strength_group_and_options():
    from chiplock.fingerprint import source_class, strength_group

    assert strength_group("precision") == strength_group("clock") == "configuration"
    assert strength_group("sram") == "sram" and strength_group("not-registered") == "not-registered"
    assert [o.name for o in source_class("sram").cli_options] == ["sram_dump", "sram_sim"]
    clock_device = source_class("clock").cli_options[0]
    assert clock_device.value("auto") == "cpu" and clock_device.value("cuda") == "cuda"


def test_option_flags_values_and_choices():
    opt = Option("sram_dump", Path, None, "Dump.", kwarg="path")
    assert opt.flags == ("--sram-dump",) and opt.value(None) is None
    assert Option("hinge", bool, True).flags == ("--hinge/--no-hinge",)
    assert Option("lam", float, 1.0, flag="--lambda").flags == ("--lambda",)
    dev = Option("device", str, "cpu", choices=("cpu", "cuda"))
    with pytest.raises(UnsupportedConfig, match="^--device must be one of cpu, cuda, not 'tpu'$"):
        dev.value("tpu")


def test_merge_options_shows_a_shared_flag_once():
    merged = merge_options([("a", [Option("device", str, "cpu", "Where a runs.", choices=("cpu",))]),
                            ("b", [Option("device", str, "cpu", "Where b runs.", choices=("cpu", "cuda"))]),
                            ("c", [Option("path", Path, None, "A file.")])])
    assert list(merged) == ["device", "path"]
    assert merged["device"].choices == ("cpu", "cuda") and merged["device"].help == "a: Where a runs; b: Where b runs."


def test_softlock_options_come_from_the_config_fields():
    from chiplock.softlock.config import SoftLockConfig

    opts = {o.name: o for o in options_from_dataclass(SoftLockConfig)}
    assert "authorized" not in opts and "version" not in opts
    assert opts["lam"].flags == ("--lambda",) and opts["epsilon"].type is float and opts["epsilon"].default is None
    assert opts["levers"].choices == ("auto", "decoys", "levers", "none") and opts["hinge"].flags == ("--hinge/--no-hinge",)


def test_with_options_adds_typer_options_and_passes_their_values():
    app = typer.Typer()
    seen = {}

    @app.command()
    @with_options([Option("device", str, "cpu", "Where.", choices=("cpu", "cuda")),
                   Option("dump", Path, None, "A file."), Option("fast", bool, False, "Hurry.")])
    def cmd(name: str = typer.Option("x", "--name"), **values) -> None:
        seen.update(values, name=name)

    res = CliRunner().invoke(app, ["--name", "n", "--device", "cuda", "--dump", "f.bin", "--fast"])
    assert res.exit_code == 0, res.output
    assert seen == {"name": "n", "device": "cuda", "dump": Path("f.bin"), "fast": True}
    assert "(cpu, cuda)" in CliRunner().invoke(app, ["--help"]).output


def test_choices_enum_values():
    e = choices_enum("T", ["aes", "pre-aes"])
    assert [m.value for m in e] == ["aes", "pre-aes"] and e.pre_aes == "pre-aes"
