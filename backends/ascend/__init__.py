"""Ascend backend: torch_npu ops on Huawei NPUs."""
