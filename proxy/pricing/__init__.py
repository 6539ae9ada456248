"""The price book (dated DeepSeek prices as data) and the pure engine that prices a call.

- `model`    - frozen dataclasses: versions, aliases, retirements, schedules, calendars, fees
- `fields`   - readers for the scalar fields of the YAML format
- `loader`   - YAML files -> validated `PriceBook` (every defect reported, with file and entry)
- `read_schedules`, `read_models` - the loader's readers of each section of a file
- `validate` - checks spanning entries (schedules, calendars, alias targets and cycles)
- `engine`   - lookups: the price version, tier rule, tier and tool fee in force at an instant
- `statutory` - China's holidays fixed by law, priced provisionally before a year's calendar
- `pricer`   - `price(book, model, usage, at)` -> `Pricing`, exact `Decimal`, no clock, no I/O;
               `Pricer`, the same with a memo of lookups, owned by the app for the request path
- `render`   - text and JSON presentation for the command line
- `commands` - ``python -m proxy prices check|quote|show``
"""

from proxy.pricing.errors import BookProblem, PriceBookError
from proxy.pricing.loader import load_price_book
from proxy.pricing.model import PriceBook
from proxy.pricing.pricer import Cost, Pricer, Pricing, price

__all__ = [
    "BookProblem",
    "Cost",
    "PriceBook",
    "PriceBookError",
    "Pricer",
    "Pricing",
    "load_price_book",
    "price",
]
