import pytest

from igniter.registry import REGISTRIES, Registry, RegistryError, model_registry


def test_nine_registries_with_builtins():
    assert sorted(REGISTRIES) == sorted(
        ["engine", "model", "dataset", "solver", "io", "function", "transforms", "event handler", "runner"]
    )
    import igniter  # noqa: F401  (registers the built-ins)

    for name, registry in REGISTRIES.items():
        assert len(registry) > 0, f"{name} registry has no built-in entry"
    assert {"mlp", "lenet"} <= set(model_registry.names())


def test_register_by_explicit_and_own_name():
    reg = Registry("thing")

    @reg("alpha")
    def make_alpha():
        return 1

    @reg
    def beta():
        return 2

    assert "alpha" in reg and "beta" in reg and "make_alpha" not in reg
    assert reg.get("alpha")() == 1 and reg.get("beta")() == 2
    assert reg.names() == ["alpha", "beta"]
    assert list(reg) == ["alpha", "beta"]


def test_entry_remembers_module_and_file():
    reg = Registry("thing")

    @reg("x")
    class X:
        pass

    entry = reg.entry("x")
    assert entry.module == __name__
    assert entry.file is not None and entry.file.endswith("test_registry.py")


def test_duplicate_name_is_an_error_unless_override():
    reg = Registry("thing")
    reg.register(int, "n")
    with pytest.raises(RegistryError, match="'n' is already registered"):
        reg.register(float, "n")
    reg.register(float, "n", override=True)
    assert reg.get("n") is float

    @reg("n", override=True)
    def n():
        return 0

    assert reg.get("n") is n


def test_lookup_error_names_registry_key_suggestion_and_list():
    reg = Registry("model")
    for name in ("lenet", "mlp", "resnet18"):
        reg.register(object, name)
    with pytest.raises(RegistryError) as info:
        reg.get("resnet19", config_key="model.name")
    msg = str(info.value)
    assert "model registry has no 'resnet19'" in msg
    assert "'model.name'" in msg
    assert "Did you mean 'resnet18'?" in msg
    assert "lenet, mlp, resnet18" in msg


def test_no_suggestion_for_unrelated_name():
    reg = Registry("model")
    reg.register(object, "lenet")
    with pytest.raises(RegistryError) as info:
        reg.get("transformer")
    assert "Did you mean" not in str(info.value)
