"""Lightning callbacks for paretomerge (front logging, the MAP baseline). They import paretomerge, never the reverse."""
