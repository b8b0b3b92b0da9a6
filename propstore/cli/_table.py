"""Tables that fit the terminal: each column is declared once, with a priority and a way to
shrink, and the columns that do not fit the width are dropped, least important first.

A command describes its table as a list of :class:`Column` (a heading, how to get the cell
from a row, a priority) and hands rows grouped in sections to :class:`FittedTable`, a rich
renderable that chooses the columns when it is drawn, so the same object fits an 80-column
terminal, a live view of any size, and a pipe (where the console is unbounded and every
column shows). Priority 0 columns are never dropped; the others go from the highest
number down (the rightmost first among equals), and a note under the table names them.

rich does the measuring and the wrapping; what it lacks is dropping whole columns (it
squeezes every column instead, which cut ``shard`` and ``state`` to ``…`` at 80 columns).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from rich import box
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

R = TypeVar("R")
Shrink = Literal["keep", "wrap", "ellipsis"]
Justify = Literal["left", "center", "right"]

#: The column gap (_GAP): one space of padding plus rich's (blank) column divider.
_PADDING = (0, 1, 0, 0)
_GAP = 2


@dataclass(frozen=True, slots=True)
class Column(Generic[R]):
    """One column of a :class:`FittedTable`.

    Attributes:
        heading: the column's title.
        cell: the cell of one row (plain text or a styled ``rich.text.Text``).
        priority: 0 for a column always shown; 1, 2, ... for columns dropped when the
            width is short, the highest number first.
        shrink: ``keep`` (never narrower than its widest cell), ``wrap`` (cells and
            heading break at spaces, down to their longest word) or ``ellipsis`` (cut to
            ``min_width`` with ``…`` once no other column can be dropped).
        justify: ``left``, ``center`` or ``right``.
        min_width: for ``ellipsis``, the narrowest it may become (default: the heading).
    """

    heading: str
    cell: Callable[[R], str | Text]
    priority: int = 0
    shrink: Shrink = "keep"
    justify: Justify = "left"
    min_width: int | None = None


def _plain(cell: str | Text) -> str:
    return cell.plain if isinstance(cell, Text) else cell


def _width(text: str) -> int:
    return max((cell_len(line) for line in text.splitlines()), default=0)


class FittedTable(Generic[R]):
    """A rich renderable: ``sections`` of rows under ``columns``, fitted to the width it is
    drawn at (see the module docstring); ``wide`` keeps every column.

    :meth:`visible` tells which columns a given width keeps, for callers and tests.
    """

    def __init__(self, columns: Sequence[Column[R]], sections: Iterable[Sequence[R]], *,
                 wide: bool = False, title: str | None = None) -> None:
        self.columns = tuple(columns)
        self.wide = wide
        self.title = title
        self._sections = [list(section) for section in sections]
        # Cells are computed once: a live view redraws the same object at several widths.
        self._cells = [[[column.cell(row) for column in self.columns] for row in section]
                       for section in self._sections]
        texts = [[column.heading] for column in self.columns]
        for section in self._cells:
            for row in section:
                for index, cell in enumerate(row):
                    texts[index].append(_plain(cell))
        self._natural = [max(map(_width, column_texts)) for column_texts in texts]
        self._narrowest = [self._narrowest_of(column, natural, column_texts) for column,
                           natural, column_texts in zip(self.columns, self._natural, texts,
                                                        strict=True)]

    @staticmethod
    def _narrowest_of(column: Column[R], natural: int, texts: list[str]) -> int:
        if column.shrink == "wrap":
            return max(cell_len(word) for text in texts for word in [*text.split(), ""])
        if column.shrink == "ellipsis":
            return min(natural, column.min_width or cell_len(column.heading))
        return natural

    def _table(self, shown: Sequence[int], widths: Sequence[int]) -> Table:
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=_PADDING,
                      title=self.title, title_justify="left")
        for index, width in zip(shown, widths, strict=True):
            column = self.columns[index]
            table.add_column(column.heading, justify=column.justify, width=width,
                             no_wrap=column.shrink != "wrap",
                             overflow="fold" if column.shrink == "wrap" else "ellipsis")
        for section in self._cells:
            for i, row in enumerate(section):
                table.add_row(*(row[index] for index in shown),
                              end_section=i == len(section) - 1)
        return table

    def _widths(self, shown: Sequence[int], width: int) -> list[int] | None:
        """Column widths that fit ``width``, or None when even the narrowest do not.

        Wrapping columns give up width one character at a time, the one with the most to
        spare first (rich would shrink the widest, folding words such as a profile name).
        """
        gaps = _GAP * (len(shown) - 1)
        widths = [self._natural[i] for i in shown]
        narrowest = [self._narrowest[i] for i in shown]
        if sum(narrowest) + gaps > width:
            return None
        excess = sum(widths) + gaps - width
        while excess > 0:
            spare = max(range(len(shown)), key=lambda k: (widths[k] - narrowest[k], widths[k]))
            widths[spare] -= 1
            excess -= 1
        return widths

    def _fit(self, width: int) -> tuple[Table, list[int]]:
        shown = list(range(len(self.columns)))
        if self.wide:
            return self._table(shown, [self._natural[i] for i in shown]), shown
        while (widths := self._widths(shown, width)) is None:
            droppable = [i for i in shown if self.columns[i].priority > 0]
            if not droppable:
                # Nothing left to drop: the narrowest widths, and rich squeezes the rest.
                return self._table(shown, [self._narrowest[i] for i in shown]), shown
            # Highest priority number first; among equals the rightmost.
            shown.remove(max(droppable, key=lambda i: (self.columns[i].priority, i)))
        return self._table(shown, widths), shown

    def visible(self, width: int) -> list[str]:
        """The headings of the columns shown at ``width`` terminal columns."""
        _table, shown = self._fit(width)
        return [self.columns[i].heading for i in shown]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        table, shown = self._fit(options.max_width)
        yield table
        hidden = [self.columns[i].heading for i in range(len(self.columns)) if i not in shown]
        if hidden:
            yield Text(f"hidden: {', '.join(hidden)} (--wide shows them)", style="dim")

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        table, _shown = self._fit(options.max_width)
        return Measurement.get(console, options, table)


__all__ = ["Column", "FittedTable"]
