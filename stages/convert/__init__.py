"""The convert stage: CellMap zarr crops -> NIfTI pairs, MONAI datalist and report."""

from stages.convert.convert import ConvertSummary, run_convert, run_convert_entry

__all__ = ["ConvertSummary", "run_convert", "run_convert_entry"]
