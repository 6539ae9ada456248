"""The ledger: every call on the books, durably (`store`), written off the request path
(`writer`); `report` and `reprice` read and correct it."""
