import pytest

from flax_resnet.tables import markdown_table


def test_markdown_table_aligns_columns():
    out = markdown_table(["arch", "img/s"], [["resnet50", 12.5], ["r18", 100]], align="lr")
    assert out.splitlines() == [
        "| arch     | img/s |",
        "|----------|------:|",
        "| resnet50 |  12.5 |",
        "| r18      |   100 |",
    ]


def test_markdown_table_refuses_ragged_rows():
    with pytest.raises(ValueError, match="row 1 has 1 cells, expected 2"):
        markdown_table(["a", "b"], [[1, 2], [3]])
