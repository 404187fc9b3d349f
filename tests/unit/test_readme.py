"""The README's configuration table is generated from the settings classes and must stay in sync."""

from pathlib import Path

from kflow._config_doc import config_table


def test_readme_config_table_matches_settings():
    readme = Path(__file__).resolve().parents[2].joinpath("README.md").read_text()
    assert config_table() in readme, "regenerate the table with `python -m kflow._config_doc`"


def test_every_setting_is_an_env_variable_with_a_description():
    for line in config_table().splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0].startswith("`KFLOW_") and cells[3], line
