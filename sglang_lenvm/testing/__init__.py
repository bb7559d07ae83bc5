"""Helpers for tests and benchmark smoke runs (as SGLang has `sglang.test`): tiny random models
built on the fly (`tiny_models`) and a real server in a subprocess (`server_process`)."""
