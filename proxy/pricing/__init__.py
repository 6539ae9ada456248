"""The price book (dated DeepSeek prices as data) and the pure engine that prices a call.

- `model`    - frozen dataclasses: versions, aliases, retirements, schedules, calendars, fees
- `fields`   - readers for the scalar fields of the YAML format
- `loader`   - YAML files -> validated `PriceBook` (every defect reported, with file and entry)
- `validate` - checks spanning entries (schedules, calendars, alias targets and cycles)
- `engine`   - `price(book, model, usage, at)` -> `Pricing`, exact `Decimal`, no clock, no I/O
- `render`   - text and JSON presentation for the command line
- `commands` - ``python -m proxy prices check|quote|show``
"""

from proxy.pricing.engine import Cost, Pricing, price
from proxy.pricing.errors import BookProblem, PriceBookError
from proxy.pricing.loader import load_price_book
from proxy.pricing.model import PriceBook

__all__ = [
    "BookProblem",
    "Cost",
    "PriceBook",
    "PriceBookError",
    "Pricing",
    "load_price_book",
    "price",
]
