"""The data flow: class folders -> validated catalogue -> de-duplicated grouped split -> shards."""
