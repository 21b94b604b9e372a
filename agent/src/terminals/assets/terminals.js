// The branch terminals' one script (served at /assets/terminals.js): the pages' Content-Security-
// Policy allows scripts from the agent itself and nothing inline. What it does on a page is
// chosen by data attributes:
// - data-print: a button that prints the page (the kiosk ticket);
// - data-back: a link that goes back in history;
// - data-live on one element: follow the branch's live feed (/display/events):
//   "board" re-renders that element from /display/board on every change (the display),
//   "reload" reloads the page on every change (the branch status page),
//   "reload-unless-select" likewise, unless a drop-down is open (the workstation).
// A feed refused (the branch serves its maximum of live feeds) or lost is opened again after a
// few seconds.
(() => {
  for (const button of document.querySelectorAll('[data-print]')) {
    button.addEventListener('click', () => window.print());
  }
  for (const link of document.querySelectorAll('[data-back]')) {
    link.addEventListener('click', (e) => {
      if (history.length > 1) {
        e.preventDefault();
        history.back();
      }
    });
  }
  const live = document.querySelector('[data-live]');
  if (!live) return;
  const mode = live.dataset.live;
  let pending = false;
  const refreshBoard = async () => {
    if (pending) return;
    pending = true;
    try {
      const r = await fetch('/display/board', { cache: 'no-store' });
      if (r.ok) live.innerHTML = await r.text();
    } finally {
      pending = false;
    }
  };
  const onChange = () => {
    if (mode === 'board') {
      refreshBoard();
    } else if (mode === 'reload') {
      location.reload();
    } else if (mode === 'reload-unless-select') {
      const active = document.activeElement;
      if (!active || active.tagName !== 'SELECT') location.reload();
    }
  };
  const connect = () => {
    const events = new EventSource('/display/events');
    events.onmessage = onChange;
    if (mode === 'board') events.onopen = refreshBoard;
    events.onerror = () => {
      // The browser retries a dropped feed itself; a refused one (503) it gives up on.
      if (events.readyState === EventSource.CLOSED) {
        setTimeout(connect, 3000 + Math.random() * 4000);
      }
    };
  };
  connect();
})();
