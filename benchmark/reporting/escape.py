"""Plain text made safe for a Markdown table cell or for LaTeX."""

from __future__ import annotations

_LATEX_SPECIALS = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def markdown_escape(name: str) -> str:
    # A "|" in a method name would split the cell and shift every column after it.
    return str(name).replace("|", r"\|")


def latex_arrows(text: str) -> str:
    """The Unicode arrows used in direction names, as math-mode arrows pdflatex can typeset."""
    return text.replace("→", r"$\rightarrow$")


def latex_escape(value: str) -> str:
    """Escape LaTeX's special characters in plain text (method names, formulas, ...)."""
    return "".join(_LATEX_SPECIALS.get(char, char) for char in str(value))
