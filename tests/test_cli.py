"""The top-level command line dispatches to sub-commands, with top-level options before them."""
import pytest

from odm_megatron.cli import _module_for_argv, main


def test_subcommand_found_after_top_level_options():
    assert _module_for_argv(["--log-level", "WARNING", "preprocess", "--help"]) == "preprocess"
    assert _module_for_argv(["--log-level=DEBUG", "train"]) == "train"
    assert _module_for_argv(["plot", "a", "b"]) == "plot"
    assert _module_for_argv(["--help"]) is None


def test_help_of_a_subcommand_after_log_level(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--log-level", "WARNING", "train-tokenizer", "--help"])
    assert e.value.code == 0
    assert "--vocab-size" in capsys.readouterr().out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "preprocess" in capsys.readouterr().out
