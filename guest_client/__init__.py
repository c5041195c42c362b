"""Guest side: the sans-IO controller, clock drivers, and the asyncio daemon that drives them."""
