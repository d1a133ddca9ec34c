"""M's recurrent core: an LSTM over [z_t, a_t]. The robot keeps its state (C reads h) and steps it once per
control step; the trainer adds the mixture-density, reward and done heads (`learner.agents.world_models.mdn_rnn`)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

State = tuple[Tensor, Tensor]  # (h, c), each (batch, units)


class Memory(nn.Module):
    """h_{t+1}, c_{t+1} = LSTM([z_t, a_t], (h_t, c_t))."""

    def __init__(self, z: int, act_dim: int, units: int) -> None:
        super().__init__()
        self.units = units
        self.cell = nn.LSTMCell(z + act_dim, units)

    def initial(self, batch: int, device: torch.device | str = "cpu") -> State:
        zeros = torch.zeros(batch, self.units, device=device)
        return zeros, zeros.clone()

    def forward(self, z: Tensor, action: Tensor, state: State) -> State:
        return self.cell(torch.cat([z, action], -1), state)
