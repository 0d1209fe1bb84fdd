//! Stop sequences (the server's `stop`, llama.cpp's `-r/--reverse-prompt`): the reply ends where one
//! appears, without it. Text that could be the start of one is held back until the next tokens tell, so
//! a stream never sends what a stop sequence then takes back.

pub struct StopSequences {
    stops: Vec<String>,
    held: String,
}

impl StopSequences {
    /// Empty strings are ignored (one would match before any text).
    pub fn new(mut stops: Vec<String>) -> Self {
        stops.retain(|s| !s.is_empty());
        StopSequences { stops, held: String::new() }
    }

    /// Adds generated text; returns what can be sent now, and whether a stop sequence was reached
    /// (the text before it is what is returned; the rest is dropped).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.held.push_str(text);
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            self.held.truncate(at);
            return (std::mem::take(&mut self.held), true);
        }
        let keep = self.partial_match_len();
        let send = self.held[..self.held.len() - keep].to_owned();
        self.held.drain(..self.held.len() - keep);
        (send, false)
    }

    /// The held-back text, at the end of the reply.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length of the longest end of the held text that begins some stop sequence.
    fn partial_match_len(&self) -> usize {
        let held = self.held.as_str();
        let starts = held.char_indices().map(|(i, _)| i);
        starts
            .filter(|&i| self.stops.iter().any(|s| s.starts_with(&held[i..])))
            .map(|i| held.len() - i)
            .next()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `pieces`; returns what was sent (pieces joined with |) and whether it stopped.
    fn feed(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut s = StopSequences::new(stops.iter().map(|s| s.to_string()).collect());
        let mut sent = Vec::new();
        for p in pieces {
            let (text, stopped) = s.push(p);
            sent.push(text);
            if stopped {
                return (sent.join("|"), true);
            }
        }
        sent.push(s.finish());
        (sent.join("|"), false)
    }

    #[test]
    fn text_before_a_stop_sequence_is_sent_and_the_rest_dropped() {
        assert_eq!(feed(&[], &["a", "b"]), ("a|b|".into(), false));
        assert_eq!(feed(&[""], &["a", "b"]), ("a|b|".into(), false));
        assert_eq!(feed(&["END"], &["hello E", "N", "D and more"]), ("hello ||".into(), true));
        assert_eq!(feed(&["END"], &["xENDy"]), ("x".into(), true));
        // A near miss is sent once it is clear.
        assert_eq!(feed(&["END"], &["E", "Nx"]), ("|ENx|".into(), false));
        // The earliest of several.
        assert_eq!(feed(&["b", "a"], &["xxab"]), ("xx".into(), true));
        // Held text comes out at the end.
        assert_eq!(feed(&["END"], &["abcE"]), ("abc|E".into(), false));
        // Multi-byte characters are never split.
        assert_eq!(feed(&["é!"], &["café", "?"]), ("caf|é?|".into(), false));
    }
}
