"""The configuration: defaults, validation messages, path resolution, the CLI check."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from ichnode.config import ConfigError, load_config, parse_config
from tests.conftest import REPO, config_data, run_cli, write_config


def test_shipped_config_yaml_equals_embedded_defaults() -> None:
    shipped = load_config(REPO / "config.yaml")
    embedded = parse_config({}, REPO.resolve())
    assert shipped == embedded
    # Spot-check that the comparison is about real values, not two empty objects.
    assert shipped.node.port == 11112
    assert shipped.storage.spool_dir == REPO.resolve() / "ichnode-data" / "spool"
    assert shipped.access.allow[0].ae_title == "*"


@pytest.mark.parametrize(
    ("data", "key", "value"),
    [
        ({"node": {"port": 70000}}, "node.port", "70000"),
        ({"node": {"portt": 11112}}, "node.portt", "11112"),
        ({"node": {"ae_title": "AN_AE_TITLE_TOO_LONG"}}, "node.ae_title", "AN_AE_TITLE_TOO_LONG"),
        ({"node": {"ae_title": "    "}}, "node.ae_title", "'    '"),
        ({"access": {"allow": [{"ae_title": "BACK\\SLASH"}]}}, "access.allow.0.ae_title", "BACK"),
        ({"storage": {"min_free_mb": -1}}, "storage.min_free_mb", "-1"),
        ({"series": {"stable_seconds": 0}}, "series.stable_seconds", "0"),
        ({"model": {"thresholds": {"subdurall": 0.5}}}, "model.thresholds", "subdurall"),
        ({"logging": {"level": "LOUD"}}, "logging.level", "LOUD"),
        ({"database": {"url": "not a url"}}, "database.url", "not a url"),
        # pynetdicom refuses any AE title that is not ASCII, but only when the node starts or sends.
        ({"node": {"ae_title": "ICHNÖDE"}}, "node.ae_title", "ICHNÖDE"),
        ({"access": {"allow": [{"ae_title": "CT_SCÄNNER"}]}}, "access.allow.0.ae_title", "CT_SCÄNNER"),
        (
            {"reports": {"destinations": [{"ae_title": "PACS_Ü", "host": "10.1.2.10", "port": 104}]}},
            "reports.destinations.0.ae_title",
            "PACS_Ü",
        ),
        # A port written into host: a name that is never resolved, a peer that never matches.
        (
            {"reports": {"destinations": [{"ae_title": "PACS", "host": "10.1.2.10:104", "port": 104}]}},
            "reports.destinations.0.host",
            "10.1.2.10:104",
        ),
        (
            {"access": {"allow": [{"ae_title": "PACS", "host": "10.1.2.10:104", "port": 104}]}},
            "access.allow.0.host",
            "10.1.2.10:104",
        ),
    ],
)
def test_bad_value_names_key_and_value(tmp_path: Path, data: dict, key: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data, tmp_path)
    message = str(info.value)
    assert key in message
    assert value in message


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///:memory:",
        "sqlite://",
        "sqlite+pysqlite:///:memory:",
        "sqlite:///file:ichnode?mode=memory&cache=shared&uri=true",
        "sqlite:///file::memory:?uri=true",
    ],
)
def test_in_memory_sqlite_database_is_refused(tmp_path: Path, url: str) -> None:
    # Each thread (and process) of the node would get its own empty database:
    # every C-STORE would then fail with "no such table".
    with pytest.raises(ConfigError) as info:
        parse_config({"database": {"url": url}}, tmp_path)
    message = str(info.value)
    assert "database.url" in message
    assert "in-memory" in message
    assert "use a file" in message


def test_sqlite_file_urls_are_accepted(tmp_path: Path) -> None:
    for url in (f"sqlite:///{tmp_path / 'node.db'}", f"sqlite:///file:{tmp_path / 'node.db'}?uri=true"):
        assert parse_config({"database": {"url": url}}, tmp_path).database.url == url


def test_empty_allow_list_is_refused(tmp_path: Path) -> None:
    # Default deny: an empty list would refuse every association.
    with pytest.raises(ConfigError) as info:
        parse_config({"access": {"allow": []}}, tmp_path)
    message = str(info.value)
    assert "access.allow" in message
    assert "refuses every association" in message
    assert 'ae_title: "*"' in message
    # The explicit entry the message names is accepted and means any AE title from anywhere.
    config = parse_config({"access": {"allow": [{"ae_title": "*"}]}}, tmp_path)
    assert [(peer.ae_title, peer.host) for peer in config.access.allow] == [("*", None)]


def test_not_a_mapping_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_invalid_yaml_and_missing_file_are_config_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("node: {port: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")


def test_ae_title_surrounding_spaces_are_not_significant(tmp_path: Path) -> None:
    # DICOM: leading/trailing spaces of an AE title are not significant; the
    # receiver compares the stripped called AE title with this value.
    config = parse_config({"node": {"ae_title": " ICHNODE "}}, tmp_path)
    assert config.node.ae_title == "ICHNODE"


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "etc" / "ichnode"
    folder.mkdir(parents=True)
    path = write_config(
        folder / "node.yaml",
        {"storage": {"spool_dir": "data/spool"}, "database": {"url": "sqlite:///data/node.db"}},
    )
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(Path("..") / "etc" / "ichnode" / "node.yaml")
    assert config.storage.spool_dir == folder.resolve() / "data" / "spool"
    assert config.database.url == f"sqlite:///{folder.resolve() / 'data' / 'node.db'}"
    # Absolute paths and non-file URLs are left alone.
    write_config(
        path,
        {"storage": {"spool_dir": str(tmp_path / "abs")}, "database": {"url": "postgresql://u@dbhost/ichnode"}},
    )
    config = load_config(path)
    assert config.storage.spool_dir == tmp_path / "abs"
    assert config.database.url == "postgresql://u@dbhost/ichnode"


def test_environment_variable_names_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(tmp_path / "from-env.yaml", {"node": {"port": 4242, "ae_title": "FROM_ENV"}})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ICHNODE_CONFIG", str(path))
    config = load_config()
    assert (config.node.port, config.node.ae_title) == (4242, "FROM_ENV")
    # Without the variable and without ./config.yaml: the embedded defaults, relative to the cwd.
    monkeypatch.delenv("ICHNODE_CONFIG")
    config = load_config()
    assert config.node.port == 11112
    assert config.storage.spool_dir == tmp_path / "ichnode-data" / "spool"


def test_check_config_rejects_a_bad_file(tmp_path: Path) -> None:
    path = write_config(tmp_path / "bad.yaml", {"node": {"port": 70000}})
    result = run_cli(["check-config", "--config", str(path)])
    assert result.returncode == 1
    assert "node.port" in result.stderr
    assert "70000" in result.stderr
    assert result.stdout == ""


def test_check_config_prints_the_effective_config(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "good.yaml", {"node": {"port": 4243}, "storage": {"spool_dir": "spool-here"}}
    )
    result = run_cli(["check-config", "--config", str(path)])
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["node"]["port"] == 4243
    assert printed["node"]["ae_title"] == "ICHNODE"  # defaults filled in
    assert printed["storage"]["spool_dir"] == str(tmp_path.resolve() / "spool-here")
    # What it prints is itself a valid configuration with the same meaning.
    assert parse_config(printed, tmp_path) == load_config(path)


def test_check_config_honours_the_environment_variable(tmp_path: Path) -> None:
    path = write_config(tmp_path / "env.yaml", {"node": {"ae_title": "ENV_NODE"}})
    env = {**os.environ, "ICHNODE_CONFIG": str(path)}
    result = run_cli(["check-config"], env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["node"]["ae_title"] == "ENV_NODE"

    write_config(path, {"node": {"ae_title": "BAD\\AE"}})
    result = run_cli(["check-config"], env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert "node.ae_title" in result.stderr


def test_ae_titles_must_be_ascii_in_check_config(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text("node:\n  ae_title: ICHNÖDE\n", encoding="utf-8")
    result = run_cli(["check-config", "--config", str(path)])
    assert result.returncode == 1
    assert "node.ae_title" in result.stderr
    assert "ASCII" in result.stderr


def test_an_ipv6_address_is_a_host(tmp_path: Path) -> None:
    destination = {"ae_title": "PACS", "host": "fd00::10", "port": 104}
    config = parse_config({"reports": {"destinations": [destination]}}, tmp_path)
    assert config.reports.destinations[0].host == "fd00::10"


def test_model_path_needs_the_model_and_its_card(tmp_path: Path) -> None:
    from ichnode.config import model_path_problem
    from ichnode.model import card_path_for, default_model_path

    def problem(path: str) -> str | None:
        return model_path_problem(parse_config({"model": {"path": path}}, tmp_path))

    bundled = default_model_path()
    # The bundled model, named by file or by its folder, is accepted.
    assert problem(str(bundled)) is None and problem(str(bundled.parent)) is None
    # A copy without its card is not; the message names the card it looked for.
    (tmp_path / "models").mkdir()
    copy = tmp_path / "models" / "mine.keras"
    copy.write_bytes(bundled.read_bytes())
    assert f"model.path: the model card {card_path_for(copy)} is missing" in problem("models/mine.keras")
    # A folder with no model in it is not either, nor a file that is not there.
    (tmp_path / "empty").mkdir()
    assert problem("empty").startswith("model.path: expected a .keras file or a folder holding one, found 0")
    assert "no such file" in problem("models/absent.keras")


def test_check_config_names_a_model_that_is_not_there_other_commands_need_none(tmp_path: Path) -> None:
    # A receiver or a dispatcher runs where the model is not (a shared folder
    # of the worker's host, say): only check-config and the worker look.
    data = config_data(tmp_path, model={"path": "/srv/models/absent.keras"})
    path = write_config(tmp_path / "ichnode.yaml", data)
    checked = run_cli(["check-config", "--config", str(path)])
    assert checked.returncode == 1 and "model.path" in checked.stderr and "absent.keras" in checked.stderr
    assert parse_config(data, tmp_path).model.path == Path("/srv/models/absent.keras")
    # A worker needs it: serve says which key, before it creates the database.
    served = run_cli(["serve", "--config", str(path), "--components", "worker"])
    assert served.returncode == 1 and "model.path: expected a .keras file" in served.stderr, served.stderr
    assert not (tmp_path / "ichnode.db").exists()


@pytest.mark.parametrize(
    "allow",
    [
        [{"ae_title": "*", "host": "127.0.0.1"}],
        [{"ae_title": "*", "host": "10.1.2.3", "port": 104}],
        [{"ae_title": "CT_SCANNER_1", "host": "10.1.2.3"}],
        [{"ae_title": "CT_SCANNER_1", "port": 104}],
    ],
)
def test_return_to_sender_needs_a_named_sender_with_host_and_port(tmp_path: Path, allow: list) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"access": {"allow": allow}, "reports": {"return_to_sender": True}}, tmp_path)
    message = str(info.value)
    assert "reports.return_to_sender" in message
    assert "wildcard entries" in message
    allow = [*allow, {"ae_title": "PACS", "host": "10.1.2.10", "port": 104}]
    config = parse_config({"access": {"allow": allow}, "reports": {"return_to_sender": True}}, tmp_path)
    assert config.reports.return_to_sender


def test_a_file_that_is_not_utf8_is_named_with_the_byte_and_line(tmp_path: Path) -> None:
    # A comment saved as Latin-1 on a Windows workstation.
    path = tmp_path / "latin1.yaml"
    head = b"node:\n  port: 4244\n# PACS Radiologie, Geb"
    path.write_bytes(head + "äude 3\n".encode("latin-1"))
    expected = f"{path} is not UTF-8 text: byte 0xe4 at offset {len(head)} (line 3); save it as UTF-8"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == expected
    # One line from check-config, meant to catch bad files, and from the other commands.
    checked = run_cli(["check-config", "--config", str(path)])
    assert (checked.returncode, checked.stderr.splitlines()) == (1, [f"error: {expected}"])
    status = run_cli(["status", "--config", str(path)])
    assert (status.returncode, status.stderr.splitlines()) == (1, [f"Error: {expected}"])


def test_a_key_given_twice_is_an_error_naming_both_lines(tmp_path: Path) -> None:
    # A second "node:" block appended later would silently undo the first.
    path = tmp_path / "dup.yaml"
    path.write_text("node:\n  port: 4242\n  ae_title: MYNODE\nstorage:\n  min_free_mb: 10\nnode:\n  host: 0.0.0.0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: node is given twice, lines 1 and 6; remove one"
    checked = run_cli(["check-config", "--config", str(path)])
    assert checked.returncode == 1 and "node is given twice, lines 1 and 6" in checked.stderr
    assert checked.stdout == ""
    # Within a section too.
    path.write_text("node:\n  port: 4242\n  ae_title: MYNODE\n  port: 4243\n")
    with pytest.raises(ConfigError, match="port is given twice, lines 2 and 4"):
        load_config(path)
    # A merge key is no repeat.
    path.write_text("node:\n  <<: {port: 4242}\n  ae_title: MYNODE\n")
    assert load_config(path).node.port == 4242


def test_a_section_left_empty_takes_the_defaults(tmp_path: Path) -> None:
    # Commenting out every key of a section is how the shipped file is reset to defaults.
    from ichnode.config import NodeConfig, RetryConfig

    path = tmp_path / "empty-section.yaml"
    path.write_text("node:\n  # ae_title: ICHNODE\n  # port: 11112\nreports:\n  retry:\nstorage:\n  min_free_mb: 100\n")
    config = load_config(path)
    assert config.node == NodeConfig()
    assert config.reports.retry == RetryConfig()
    assert config.storage.min_free_mb == 100
    checked = run_cli(["check-config", "--config", str(path)])
    assert checked.returncode == 0, checked.stderr


@pytest.mark.parametrize(
    ("data", "key", "says"),
    [
        # A subnet would be looked up as a host name and refuse every association.
        (
            {"access": {"allow": [{"ae_title": "*", "host": "10.1.2.0/24"}]}},
            "access.allow.0.host",
            "networks are not supported",
        ),
        ({"access": {"allow": [{"ae_title": "*", "host": ""}]}}, "access.allow.0.host", "leave host out"),
        # "" would listen on every interface.
        ({"node": {"host": ""}}, "node.host", "write 0.0.0.0 (or ::) to listen on every interface"),
        ({"node": {"host": "10.1.2.0/24"}}, "node.host", "networks are not supported"),
        ({"node": {"host": "10.0.0.1:104"}}, "node.host", "without a port"),
        (
            {"reports": {"destinations": [{"ae_title": "PACS", "host": " ", "port": 104}]}},
            "reports.destinations.0.host",
            "host must not be empty",
        ),
    ],
)
def test_hosts_that_can_never_work_are_refused(tmp_path: Path, data: dict, key: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data, tmp_path)
    assert f"{key}: Value error, " in str(info.value)
    assert says in str(info.value)


def test_listening_everywhere_is_written_out(tmp_path: Path) -> None:
    for host in ("0.0.0.0", "::", "ichnode.example", "fd00::1"):
        assert parse_config({"node": {"host": host}}, tmp_path).node.host == host


def test_a_destination_listed_twice_is_refused(tmp_path: Path) -> None:
    # Each report would be C-STOREd twice to the same PACS.
    pacs = {"ae_title": "PACS", "host": "10.1.2.10", "port": 104}
    with pytest.raises(ConfigError) as info:
        parse_config({"reports": {"destinations": [pacs, pacs]}}, tmp_path)
    assert "reports.destinations: Value error, PACS@10.1.2.10:104 is listed twice" in str(info.value)
    # Host names are not case-sensitive.
    upper = {**pacs, "host": "PACS.example"}
    with pytest.raises(ConfigError, match="is listed twice"):
        parse_config({"reports": {"destinations": [upper, {**upper, "host": "pacs.example"}]}}, tmp_path)
    # Another port or AE title is another destination.
    others = [pacs, {**pacs, "port": 11112}, {**pacs, "ae_title": "PACS2"}]
    assert len(parse_config({"reports": {"destinations": others}}, tmp_path).reports.destinations) == 3


def test_check_config_reads_the_model_card_and_file_as_serve_does(tmp_path: Path) -> None:
    import json
    import zipfile

    from ichnode.config import model_path_problem
    from ichnode.model import card_path_for, default_model_path

    bundled = default_model_path()
    (tmp_path / "m").mkdir()
    model = tmp_path / "m" / "x.keras"
    model.write_bytes(bundled.read_bytes())
    card = json.loads(card_path_for(bundled).read_text())
    card["thresholds"]["subdural"] = 1.7
    card_path_for(model).write_text(json.dumps(card))
    data = config_data(tmp_path, model={"path": "m/x.keras"})
    path = write_config(tmp_path / "node.yaml", data)

    problem = model_path_problem(load_config(path))
    assert problem.startswith(f"model.path: model card {card_path_for(model)} is invalid: field 'thresholds'")
    assert "1.7" in problem
    checked = run_cli(["check-config", "--config", str(path)])
    assert checked.returncode == 1
    assert checked.stderr.splitlines() == ["error: invalid configuration:", f"  {problem}"]

    # A good card beside a file that is no Keras model: garbage, or a zip without config.json.
    card_path_for(model).write_text(card_path_for(bundled).read_text())
    assert model_path_problem(load_config(path)) is None
    not_keras = f"model.path: {model} is not a Keras model file (a zip archive holding config.json)"
    model.write_text("garbage\n")
    assert model_path_problem(load_config(path)) == not_keras
    with zipfile.ZipFile(model, "w") as archive:
        archive.writestr("model.weights.h5", b"")
    assert model_path_problem(load_config(path)) == not_keras


def _missing_keras_backend() -> str:
    import importlib.util

    for backend in ("jax", "torch", "openvino"):
        if importlib.util.find_spec(backend) is None:
            return backend
    pytest.skip("every Keras backend is installed here")


def test_check_config_names_a_keras_backend_that_is_not_installed(tmp_path: Path) -> None:
    missing = _missing_keras_backend()
    path = write_config(tmp_path / "node.yaml", config_data(tmp_path))
    result = run_cli(["check-config", "--config", str(path)], env={**os.environ, "KERAS_BACKEND": missing})
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "error: invalid configuration:",
        f"  KERAS_BACKEND: Keras backend {missing!r} cannot be loaded in this environment: "
        f"No module named {missing!r}",
    ]
    # The backend this environment has is reported, as a comment of the YAML printed.
    result = run_cli(["check-config", "--config", str(path)])
    assert result.returncode == 0, result.stderr
    backend = os.environ.get("KERAS_BACKEND") or "tensorflow"
    assert result.stdout.splitlines()[-1] == f"# Keras backend: {backend} (KERAS_BACKEND), installed"
    assert parse_config(yaml.safe_load(result.stdout), tmp_path) == load_config(path)


def test_check_config_loads_the_keras_backend_as_serve_does(tmp_path: Path) -> None:
    # jax installed without jaxlib (or the numpy backend without scipy): the
    # backend's package is there, and serve still cannot load the backend.
    site = tmp_path / "site"
    (site / "jax").mkdir(parents=True)
    (site / "jax" / "__init__.py").write_text('raise ModuleNotFoundError("jax requires jaxlib to be installed")\n')
    python_path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": python_path}
    path = write_config(tmp_path / "node.yaml", config_data(tmp_path))
    result = run_cli(["check-config", "--config", str(path)], env=env)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "error: invalid configuration:",
        "  KERAS_BACKEND: Keras backend 'jax' cannot be loaded in this environment: "
        "jax requires jaxlib to be installed",
    ]


@pytest.mark.parametrize(
    ("text", "key"),
    [
        # YAML reads yes/true as a boolean, which a lax integer would take as 1:
        # images deleted after one day, a node listening on port 1.
        ("storage:\n  retention_days: true\n", "storage.retention_days"),
        ("node:\n  port: yes\n", "node.port"),
        ("model:\n  worker_processes: on\n", "model.worker_processes"),
        ("access:\n  allow: [{ae_title: CT, host: 10.1.2.3, port: yes}]\n", "access.allow.0.port"),
        ("reports:\n  timeout_seconds: yes\n", "reports.timeout_seconds"),
        ("model:\n  thresholds: {subdural: true}\n", "model.thresholds.subdural"),
    ],
)
def test_a_boolean_is_no_number(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "node.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"{key}: Value error, a number is needed, not yes/no/on/off/true/false (got True)" in str(info.value)


def test_numbers_are_taken_as_they_come(tmp_path: Path) -> None:
    # As they loaded before booleans were refused: YAML reads 6e2 as text.
    text = "node: {port: '11112'}\nstorage: {retention_days: 7.0}\nreports: {retry: {max_delay_s: 6e2}}\n"
    (tmp_path / "node.yaml").write_text(text)
    config = load_config(tmp_path / "node.yaml")
    assert (config.node.port, config.storage.retention_days, config.reports.retry.max_delay_s) == (11112, 7, 600.0)
    config = parse_config({"reports": {"timeout_seconds": 45}, "model": {"thresholds": {"any": 1}}}, tmp_path)
    assert (config.reports.timeout_seconds, config.model.thresholds) == (45.0, {"any": 1.0})
    with pytest.raises(ConfigError, match=r"node.port: Input should be a valid integer, got a number with a fraction"):
        parse_config({"node": {"port": 104.5}}, tmp_path)


def test_a_leading_tilde_is_the_home_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As the node's user sees it: systemd sets HOME to the service user's home.
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    data = {
        "storage": {"spool_dir": "~/ichnode/spool"},
        "database": {"url": "sqlite:///~/ichnode/ichnode.db"},
        "model": {"path": "~/models/mine.keras"},
    }
    config = parse_config(data, tmp_path / "etc")
    assert config.storage.spool_dir == home / "ichnode" / "spool"
    assert config.database.url == f"sqlite:///{home / 'ichnode' / 'ichnode.db'}"
    assert config.model.path == home / "models" / "mine.keras"
    # Only at the start: elsewhere "~" is a character of a name.
    assert parse_config({"storage": {"spool_dir": "a~/b"}}, tmp_path).storage.spool_dir == tmp_path / "a~" / "b"


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"storage": {"spool_dir": "$HOME/ichnode/spool"}}, "storage.spool_dir"),
        ({"storage": {"spool_dir": "/srv/${NODE}/spool"}}, "storage.spool_dir"),
        ({"database": {"url": "sqlite:///$STATE_DIRECTORY/ichnode.db"}}, "database.url"),
        ({"model": {"path": "$MODELS/mine.keras"}}, "model.path"),
    ],
)
def test_a_path_with_an_environment_variable_is_refused(tmp_path: Path, data: dict, key: str) -> None:
    # Not expanded, it would name a folder "$HOME" beside the configuration file.
    with pytest.raises(ConfigError) as info:
        parse_config(data, tmp_path)
    assert f"{key}: Value error, environment variables are not expanded in paths" in str(info.value)
    # A "$" in a server's password is no path.
    url = "postgresql://ichnode:pa$$word@dbhost/ichnode"
    assert parse_config({"database": {"url": url}}, tmp_path).database.url == url


def test_check_config_warns_of_a_peer_host_that_does_not_resolve(tmp_path: Path) -> None:
    # A typo in a destination would show only once its reports are dead letters, hours later.
    # A warning, not an error: the name may resolve only on the node's own network.
    data = config_data(
        tmp_path,
        access={
            "allow": [{"ae_title": "*", "host": "localhost"}, {"ae_title": "CT", "host": "ct.nonexistent.invalid"}]
        },
        reports={
            "destinations": [
                {"ae_title": "PACS", "host": "127.0.0.1", "port": 104},
                {"ae_title": "PACS2", "host": "pacs.nonexistent.invalid", "port": 104},
            ]
        },
    )
    path = write_config(tmp_path / "node.yaml", data)
    result = run_cli(["check-config", "--config", str(path)])
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2, result.stderr
    assert warnings[0].startswith("warning: access.allow.1.host: cannot resolve host ct.nonexistent.invalid: ")
    unresolved = "warning: reports.destinations.1.host: cannot resolve host pacs.nonexistent.invalid: "
    assert warnings[1].startswith(unresolved)


@pytest.mark.parametrize("host", ["ct2..radiology.org", "a" * 64 + ".org"])
def test_a_host_name_that_can_never_be_looked_up_is_refused(tmp_path: Path, host: str) -> None:
    # Taken in, it had made the receiver drop every connection with a traceback.
    for section in (
        {"access": {"allow": [{"ae_title": "CT2", "host": host}]}},
        {"reports": {"destinations": [{"ae_title": "PACS", "host": host, "port": 104}]}},
    ):
        with pytest.raises(ConfigError, match="is not a valid host name"):
            parse_config(section, tmp_path)
