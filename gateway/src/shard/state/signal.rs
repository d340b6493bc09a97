//! Single-thread wake-ups for the shard's tasks: a one-shot event with one
//! waiter, one with many, and a yield.
//!
//! Owns nothing but wakers; `Cell`/`RefCell` only, so they are `!Send` and
//! never cross a thread (other threads reach a shard through `Mesh`).

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::task::{Poll, Waker};

/// A one-shot, single-thread event with one waiter (the latest poll wins).
#[derive(Default)]
pub struct LocalSignal {
    fired: Cell<bool>,
    waiter: Cell<Option<Waker>>,
}

impl LocalSignal {
    pub fn fire(&self) {
        fire(&self.fired, &self.waiter);
    }

    pub async fn wait(&self) {
        wait(&self.fired, &self.waiter, false).await
    }
}

fn fire(fired: &Cell<bool>, waiter: &Cell<Option<Waker>>) {
    fired.set(true);
    if let Some(waker) = waiter.take() {
        waker.wake();
    }
}

/// Until `fired`; `consume` clears it on the way out.
async fn wait(fired: &Cell<bool>, waiter: &Cell<Option<Waker>>, consume: bool) {
    poll_fn(|cx| {
        if fired.get() {
            fired.set(!consume);
            return Poll::Ready(());
        }
        waiter.set(Some(cx.waker().clone()));
        Poll::Pending
    })
    .await
}

/// A one-shot, single-thread event with any number of waiters.
#[derive(Default)]
pub struct Waiters {
    fired: Cell<bool>,
    wakers: RefCell<Vec<Waker>>,
}

impl Waiters {
    pub fn fire(&self) {
        self.fired.set(true);
        for waker in self.wakers.take() {
            waker.wake();
        }
    }

    pub async fn wait(&self) {
        poll_fn(|cx| {
            if self.fired.get() {
                return Poll::Ready(());
            }
            self.wakers.borrow_mut().push(cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}

/// A reusable single-thread wake-up with one waiter: `wait` returns once
/// after any number of `fire`s since the last return.
#[derive(Default)]
pub struct Wakeup {
    fired: Cell<bool>,
    waiter: Cell<Option<Waker>>,
}

impl Wakeup {
    pub fn fire(&self) {
        fire(&self.fired, &self.waiter);
    }

    pub async fn wait(&self) {
        wait(&self.fired, &self.waiter, true).await
    }
}

/// Lets other tasks run once.
pub async fn yield_now() {
    let mut yielded = false;
    poll_fn(|cx| {
        if yielded {
            return Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}
