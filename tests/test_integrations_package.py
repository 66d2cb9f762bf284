"""attnlib.integrations imports with no host library; each adapter names its missing host."""
import importlib
import sys

import pytest


def test_package_imports_without_any_host_and_reports_availability(monkeypatch):
    for host in ("transformers", "diffusers"):
        monkeypatch.setitem(sys.modules, host, None)  # import of the host now fails
    monkeypatch.delitem(sys.modules, "attnlib.integrations", raising=False)
    integrations = importlib.import_module("attnlib.integrations")
    assert integrations.available() == {"transformers": False, "diffusers": False, "vllm_omni": True}


@pytest.mark.parametrize("adapter, host", [("transformers", "transformers"), ("diffusers", "diffusers")])
def test_adapter_without_its_host_raises_import_error_naming_it(adapter, host, monkeypatch):
    monkeypatch.setitem(sys.modules, host, None)
    monkeypatch.delitem(sys.modules, f"attnlib.integrations.{adapter}", raising=False)
    with pytest.raises(ImportError, match=f"needs the `{host}` package"):
        importlib.import_module(f"attnlib.integrations.{adapter}")


def test_vllm_omni_layer_needs_no_vllm(monkeypatch):
    for host in ("vllm", "vllm_omni"):
        monkeypatch.setitem(sys.modules, host, None)
    monkeypatch.delitem(sys.modules, "attnlib.integrations.vllm_omni", raising=False)
    module = importlib.import_module("attnlib.integrations.vllm_omni")
    assert module.Attention(2, 8, False, None).num_kv_heads == 2
