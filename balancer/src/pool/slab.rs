//! A vector of slots addressed by `u32` keys; freed keys are reused.

#[derive(Debug)]
pub(super) struct Slab<T> {
    slots: Vec<Option<T>>,
    free: Vec<u32>,
    len: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Self { slots: Vec::new(), free: Vec::new(), len: 0 }
    }
}

impl<T> Slab<T> {
    pub(super) fn insert(&mut self, value: T) -> u32 {
        self.len += 1;
        match self.free.pop() {
            Some(k) => {
                self.slots[k as usize] = Some(value);
                k
            }
            None => {
                self.slots.push(Some(value));
                u32::try_from(self.slots.len() - 1).expect("fewer than 2^32 slots")
            }
        }
    }

    /// # Panics
    /// If `k` is empty: keys are only ever held while their slot is.
    pub(super) fn remove(&mut self, k: u32) -> T {
        let value = self.slots[k as usize].take().expect("slab key in use");
        self.free.push(k);
        self.len -= 1;
        value
    }

    pub(super) fn get(&self, k: u32) -> &T {
        self.slots[k as usize].as_ref().expect("slab key in use")
    }

    pub(super) fn get_mut(&mut self, k: u32) -> &mut T {
        self.slots[k as usize].as_mut().expect("slab key in use")
    }

    #[cfg(test)]
    pub(super) fn try_get(&self, k: u32) -> Option<&T> {
        self.slots.get(k as usize).and_then(Option::as_ref)
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (u32, &T)> {
        self.slots.iter().enumerate().filter_map(|(k, v)| v.as_ref().map(|v| (k as u32, v)))
    }
}
