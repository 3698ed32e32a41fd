"""Hook points (core.hooks): where tests run their own code in the product's processes."""
from mwt_ray.core import hooks


def test_a_hook_runs_where_installed_and_a_point_without_one_costs_nothing():
    calls = []

    def record(**context):
        calls.append(context)

    assert hooks.hook_at("test.point", index=1) is None
    hooks.install("test.point", record)
    try:
        hooks.hook_at("test.point", index=1)(step=2)
    finally:
        hooks.uninstall("test.point", record)
    assert calls == [{"index": 1, "step": 2}] and hooks.hook_at("test.point") is None


def test_hook_files_named_in_the_environment_are_loaded_once_and_handed_on(tmp_path, monkeypatch):
    (tmp_path / "hook.py").write_text(
        "import os\n"
        "def install_hooks(install):\n"
        "    install('test.file_point', lambda **context: print(os.environ['MWT_RAY_HOOK_WORD'], context))\n")
    monkeypatch.setenv("MWT_RAY_HOOKS", str(tmp_path / "hook.py"))
    monkeypatch.setenv("MWT_RAY_HOOK_WORD", "seen")
    monkeypatch.setattr(hooks, "_hooks", {})
    monkeypatch.setattr(hooks, "_loaded", set())
    assert hooks.hook_env() == {"MWT_RAY_HOOKS": str(tmp_path / "hook.py"), "MWT_RAY_HOOK_WORD": "seen"}
    hooks.hook_at("test.file_point")
    assert len(hooks._hooks["test.file_point"]) == 1
    hooks.hook_at("test.file_point")
    assert len(hooks._hooks["test.file_point"]) == 1
